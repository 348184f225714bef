from __future__ import annotations

import pytest

from batchroute.config import load_config, parse_config
from batchroute.jobspec import JobSpec
from batchroute.router import RouteError, pick_model, route

CONFIG = load_config()


def spec(**kw: object) -> JobSpec:
    body = {"messages": [{"role": "user", "content": str(kw.pop("text", "hello"))}],
            "max_tokens": 50}
    return JobSpec(custom_id="x", body=body, **kw)  # type: ignore[arg-type]


def test_starts_at_the_cheapest_tier_of_the_task() -> None:
    r = route(CONFIG, spec(task="classify"), 20)
    assert r.ladder == (1, 2, 3)
    assert r.start_tier == 1
    assert r.reference_model == "sim-large"  # "auto": baseline is the task's top tier


def test_long_prompts_start_higher() -> None:
    r = route(CONFIG, spec(task="summarize"), 2000)
    assert r.start_tier == 2
    assert "2000 tokens" in r.reason


def test_keyword_rule() -> None:
    r = route(CONFIG, spec(task="code", text="write a thread-safe cache"), 30)
    assert r.start_tier == 2


def test_catalog_reference_model_caps_the_ladder() -> None:
    r = route(CONFIG, spec(reference_model="sim-medium"), 10)
    assert r.ladder == (1, 2)
    assert r.reference_model == "sim-medium"


def test_real_reference_model_is_only_the_baseline() -> None:
    r = route(CONFIG, spec(reference_model="gpt-4o"), 10)
    assert r.ladder == (1, 2, 3)
    assert r.reference_model == "gpt-4o"


def test_min_max_tier_and_pin() -> None:
    assert route(CONFIG, spec(max_tier=2), 10).ladder == (1, 2)
    assert route(CONFIG, spec(min_tier=2), 10).ladder == (2, 3)
    assert route(CONFIG, spec(pin="sim-medium"), 10).ladder == (2,)
    with pytest.raises(RouteError, match="no tier left"):
        route(CONFIG, spec(min_tier=3, max_tier=2), 10)


def test_prompt_larger_than_every_context_window() -> None:
    with pytest.raises(RouteError, match="exceeds every allowed model's context window"):
        route(CONFIG, spec(), 200_000)


def test_small_context_models_are_skipped() -> None:
    data = {"providers": {"p": {"base_url": "http://x"}},
            "models": {"small": {"provider": "p", "tier": 1, "context_window": 1000,
                                 "price": {"input_per_mtok": 1, "output_per_mtok": 1}},
                       "big": {"provider": "p", "tier": 2,
                               "price": {"input_per_mtok": 5, "output_per_mtok": 5}}}}
    r = route(parse_config(data), spec(), 5000)
    assert r.ladder == (2,)


def test_pick_model_fails_over_within_a_tier() -> None:
    data = {"providers": {"a": {"base_url": "http://a"}, "b": {"base_url": "http://b"}},
            "models": {"a1": {"provider": "a", "tier": 1,
                              "price": {"input_per_mtok": 1, "output_per_mtok": 1}},
                       "b1": {"provider": "b", "tier": 1,
                              "price": {"input_per_mtok": 1, "output_per_mtok": 1}}}}
    config = parse_config(data)
    assert pick_model(config, 1).name == "a1"  # type: ignore[union-attr]
    assert pick_model(config, 1, exclude={"a1"}).name == "b1"  # type: ignore[union-attr]
    assert pick_model(config, 1, exclude={"a", "b"}) is None
