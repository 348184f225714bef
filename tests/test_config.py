from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from batchroute.config import ConfigError, check_api_keys, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def base() -> dict:
    return {
        "providers": {"p": {"kind": "openai", "base_url": "http://x/v1"}},
        "models": {
            "a": {"provider": "p", "tier": 1, "price": {"input_per_mtok": 1, "output_per_mtok": 2}},
            "b": {"provider": "p", "tier": 2, "price_ref": "gpt-4o", "price_provider": "openai"},
        },
    }


def test_default_config_routes_to_the_simulator() -> None:
    config = load_config()
    assert config.tiers == [1, 2, 3]
    assert all(p.simulated for p in config.providers.values())
    assert {"classify", "extract", "summarize", "code", "default"} <= set(config.tasks)


def test_shipped_example_configs_parse() -> None:
    for path in sorted((ROOT / "jobs").glob("*.toml")):
        parse_config(tomllib.loads(path.read_text()), str(path))


def test_default_task_added_when_missing() -> None:
    assert parse_config(base()).task("nope").ladder == (1, 2)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["models"]["a"].update(provider="zz"), "models.a.provider: unknown provider 'zz'"),
    (lambda d: d["models"]["a"].update(tier="1"), "models.a.tier: expected int"),
    (lambda d: d["providers"]["p"].update(kind="grpc"), "providers.p.kind"),
    (lambda d: d["providers"]["p"].pop("base_url"), "providers.p.base_url: required"),
    (lambda d: d.update(tasks={"t": {"ladder": [1, 5]}}), "tasks.t.ladder: no model has tier 5"),
    (lambda d: d.update(tasks={"t": {"ladder": [2, 1]}}), "strictly increasing"),
    (lambda d: d.update(tasks={"t": {"validators": [{"type": "bogus"}]}}), "tasks.t.validators"),
    (lambda d: d["models"]["b"].update(price_ref="no-such-model-anywhere"),
     "models.b: no known price"),
])
def test_config_errors_name_the_path(mutate, message: str) -> None:
    data = base()
    mutate(data)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(data)


def test_missing_api_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    data = base()
    data["providers"]["p"]["api_key_env"] = "BR_TEST_KEY_XYZ"
    config = parse_config(data)
    monkeypatch.delenv("BR_TEST_KEY_XYZ", raising=False)
    with pytest.raises(ConfigError, match="BR_TEST_KEY_XYZ"):
        check_api_keys(config)
    monkeypatch.setenv("BR_TEST_KEY_XYZ", "sk-1")
    check_api_keys(config)


def test_missing_config_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="BATCHROUTE_CONFIG"):
        load_config(tmp_path / "nope.toml")
