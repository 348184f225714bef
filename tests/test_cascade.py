"""The adaptive cascade without servers: the expected-cost math and skip decisions
(batchroute.cascade), the [cascade] config, the ledger statistics and their per-process
cache (batchroute.adaptive), and the simulator's per-kind fail rates the benchmark uses."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import pytest

from batchroute import cascade as cm
from batchroute.adaptive import Cascade, IngestStart, read_snapshot
from batchroute.cascade import CascadeConfig, CascadeConfigError, TierStats
from batchroute.config import ConfigError, parse_config
from batchroute.sim import SimConfigError, SimModel
from batchroute.sim.answers import generate_answer
from batchroute.store import Attempt, Store

PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}


def stats(attempts: int, passes: int, mean_cost: float) -> TierStats:
    return TierStats(attempts=attempts, passes=passes, cost_usd=attempts * mean_cost)


# ---- the math -----------------------------------------------------------------------------


def test_expected_cost_of_a_ladder_suffix() -> None:
    assert cm.expected_cost([], []) == 0.0
    assert cm.expected_cost([0.5, 1.0], [1.0, 4.0]) == pytest.approx(3.0)
    # Every tier is paid for when nothing passes.
    assert cm.expected_cost([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]) == pytest.approx(6.0)
    assert cm.expected_cost([0.9, 0.5, 1.0], [1.0, 2.0, 10.0]) == pytest.approx(
        1.0 + 0.1 * (2.0 + 0.5 * 10.0))
    with pytest.raises(ValueError):
        cm.expected_cost([1.0], [1.0, 2.0])


def test_a_tier_that_nearly_always_fails_is_skipped() -> None:
    p = cm.plan([1, 2, 3], {1: stats(100, 5, 1.0), 2: stats(100, 90, 3.0),
                            3: stats(100, 100, 10.0)}, min_observations=20)
    # V3 = 10; V2 = 3 + 0.1 * 10 = 4; trying 1 costs 1 + 0.95 * 4 = 4.8 > 4.
    assert p.skipped == (1,)
    t1, t2, t3 = p.tiers
    assert t1.expected_if_tried_usd == pytest.approx(4.8)
    assert t1.expected_if_skipped_usd == pytest.approx(4.0)
    assert t2.expected_if_tried_usd == pytest.approx(4.0)
    assert not t2.skip and not t3.skip
    assert p.expected_cost_usd == pytest.approx(4.0)
    assert "> $4.000000" in t1.reason and "skipped" in t1.reason
    assert t3.reason.startswith("top of the ladder")


def test_a_tier_that_nearly_always_passes_is_kept() -> None:
    p = cm.plan([1, 2, 3], {1: stats(100, 98, 1.0), 2: stats(100, 90, 3.0),
                            3: stats(100, 100, 10.0)}, min_observations=20)
    assert p.skipped == ()
    assert p.tiers[0].expected_if_tried_usd == pytest.approx(1.0 + 0.02 * 4.0)
    assert p.expected_cost_usd == pytest.approx(1.08)
    assert "<=" in p.tiers[0].reason and "kept" in p.tiers[0].reason


def test_a_useless_middle_tier_is_skipped_on_escalation() -> None:
    p = cm.plan([1, 2, 3], {1: stats(50, 25, 1.0), 2: stats(50, 0, 3.0),
                            3: stats(50, 50, 10.0)}, min_observations=20)
    assert p.skipped == (2,)
    # Tier 1 is then compared with going straight to tier 3: 1 + 0.5 * 10 = 6 <= 10.
    assert p.tiers[0].expected_if_skipped_usd == pytest.approx(10.0)
    assert p.expected_cost_usd == pytest.approx(6.0)
    assert cm.escalation_order(p, 0, "job", explore_rate=0.0) == [2, 1]


def test_the_top_tier_is_never_skipped() -> None:
    p = cm.plan([1, 2], {1: stats(50, 50, 1.0), 2: stats(50, 0, 5.0)}, min_observations=20)
    assert not p.tiers[-1].skip
    p = cm.plan([2], {2: stats(50, 0, 5.0)}, min_observations=20)
    assert p.skipped == () and p.expected_cost_usd == pytest.approx(5.0)


def test_cold_start_keeps_the_configured_ladder() -> None:
    # 19 observations of a tier that never passes: not enough to skip it yet.
    p = cm.plan([1, 2, 3], {1: stats(19, 0, 1.0), 2: stats(100, 90, 3.0),
                            3: stats(100, 100, 10.0)}, min_observations=20)
    assert p.skipped == ()
    assert p.tiers[0].pass_rate is None
    assert "too few observations (19 < 20)" in p.tiers[0].reason
    assert cm.plan([1, 2, 3], {}, min_observations=20).skipped == ()


def test_a_cold_tier_above_counts_as_always_passing_at_its_estimated_cost() -> None:
    # Tier 2 never tried: p = 1 at the estimated cost 1.5, so trying tier 1 costs
    # 1 + 0.5 * 1.5 = 1.75 > 1.5, and tier 1 is skipped.
    p = cm.plan([1, 2], {1: stats(50, 25, 1.0)}, min_observations=20, estimates={2: 1.5})
    assert p.skipped == (1,)
    assert p.tiers[1].estimated and p.tiers[1].mean_cost_usd == 1.5
    # With neither observations nor an estimate above, nothing below can be judged: kept.
    p = cm.plan([1, 2, 3], {1: stats(50, 0, 1.0), 2: stats(50, 40, 2.0)}, min_observations=20)
    assert p.skipped == ()
    assert "unknown" in p.tiers[1].reason and "unknown" in p.tiers[0].reason


def test_the_plan_is_the_cheapest_subset_of_the_ladder() -> None:
    """Against brute force: every subset of the ladder that keeps the top tier."""
    rng = random.Random(5)
    for _ in range(300):
        n = rng.randint(1, 5)
        ladder = list(range(1, n + 1))
        ps = [rng.choice([0.0, 0.02, 0.3, 0.5, 0.9, 1.0, rng.random()]) for _ in ladder]
        cs = sorted(rng.uniform(0.1, 10) for _ in ladder)
        st = {t: stats(100, round(100 * p), c) for t, p, c in zip(ladder, ps, cs, strict=True)}
        p = cm.plan(ladder, st, min_observations=20)
        best = min(cm.expected_cost([st[ladder[i]].pass_rate for i in keep],
                                    [cs[i] for i in keep])
                   for r in range(n)
                   for keep in ([*c, n - 1] for c in itertools.combinations(range(n - 1), r)))
        kept = [i for i in range(n) if not p.tiers[i].skip]
        assert p.expected_cost_usd == pytest.approx(best)
        assert cm.expected_cost([st[ladder[i]].pass_rate for i in kept],
                                [cs[i] for i in kept]) == pytest.approx(best)


def test_exploration_is_a_deterministic_share_of_jobs() -> None:
    ids = [f"j{i:06d}" for i in range(20_000)]
    explored = [i for i in ids if cm.explores(i, 1, 0.05)]
    assert 0.04 < len(explored) / len(ids) < 0.06
    assert explored == [i for i in ids if cm.explores(i, 1, 0.05)]  # same jobs every time
    other_tier = {i for i in ids if cm.explores(i, 2, 0.05)}
    assert len(other_tier & set(explored)) < 0.2 * len(explored)  # independent per tier
    assert not any(cm.explores(i, 1, 0.0) for i in ids[:1000])
    assert all(cm.explores(i, 1, 1.0) for i in ids[:1000])


def test_start_index_and_escalation_order_honour_skips_and_exploration() -> None:
    p = cm.plan([1, 2, 3], {1: stats(100, 5, 1.0), 2: stats(100, 90, 3.0),
                            3: stats(100, 100, 10.0)}, min_observations=20)
    explorer = next(f"j{i}" for i in range(1000) if cm.explores(f"j{i}", 1, 0.05))
    other = next(f"j{i}" for i in range(1000) if not cm.explores(f"j{i}", 1, 0.05))
    assert cm.start_index(p, 0, other, 0.05) == 1
    assert cm.start_index(p, 0, explorer, 0.05) == 0
    assert cm.start_index(p, 1, other, 0.05) == 1  # already above: never moved down
    assert cm.start_index(p, 2, other, 0.05) == 2
    assert cm.escalation_order(p, 0, other, 0.05) == [1, 2]
    assert cm.escalation_order(p, 2, other, 0.05) == []


# ---- the [cascade] config -------------------------------------------------------------------


def base_config(**extra: Any) -> dict[str, Any]:
    return {"providers": {"p": {"base_url": "sim://"}},
            "models": {"m1": {"provider": "p", "tier": 1, "price": PRICE},
                       "m2": {"provider": "p", "tier": 2, "price": {"input_per_mtok": 4.0,
                                                                    "output_per_mtok": 8.0}},
                       "m3": {"provider": "p", "tier": 3, "price": {"input_per_mtok": 20.0,
                                                                    "output_per_mtok": 40.0}}},
            **extra}


def test_cascade_config_defaults_and_values() -> None:
    assert parse_config(base_config()).cascade == CascadeConfig()
    cfg = parse_config(base_config(cascade={"enabled": False, "min_observations": 5,
                                            "explore_rate": 0, "window": 100, "ttl_s": 0}))
    assert cfg.cascade == CascadeConfig(enabled=False, min_observations=5, explore_rate=0.0,
                                        window=100, ttl_s=0.0)


@pytest.mark.parametrize(("table", "expected"), [
    ({"enable": True}, "cascade: unknown key(s) 'enable'"),
    ({"enabled": "yes"}, "cascade.enabled: expected true or false"),
    ({"min_observations": 0}, "cascade.min_observations: expected an integer >= 1"),
    ({"window": 2.5}, "cascade.window: expected an integer >= 1"),
    ({"explore_rate": 1.5}, "cascade.explore_rate: expected a number between 0 and 1"),
    ({"ttl_s": -1}, "cascade.ttl_s: expected a number >= 0"),
])
def test_cascade_config_errors_name_the_key(table: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(base_config(cascade=table))
    assert expected in str(e.value)
    with pytest.raises(CascadeConfigError):
        CascadeConfig.from_dict(table)


# ---- ledger statistics and the per-process cache -------------------------------------------


# What 1,000 prompt + 100 completion tokens cost at base_config()'s prices, per tier.
C1, C2, C3 = 0.0012, 0.0048, 0.024


def add_attempts(store: Store, task: str, tier: int, ok: int, invalid: int = 0, error: int = 0,
                 cost: float = C1, prefix: str = "") -> None:
    outcomes = ["ok"] * ok + ["invalid"] * invalid + ["error"] * error
    for i, outcome in enumerate(outcomes):
        store.record_attempt(Attempt(
            job_id=f"{prefix}{task}-{tier}-{i}", batch_id="b", attempt_no=1, task=task,
            tier=tier, provider="p", model=f"m{tier}", outcome=outcome,
            cost_usd=0.0 if outcome == "error" else cost, prompt_tokens=1000,
            completion_tokens=100))


def test_tier_stats_count_answered_attempts_of_the_recent_window() -> None:
    store = Store()
    add_attempts(store, "extract", 1, ok=1, invalid=9, error=5, cost=0.5, prefix="old-")
    add_attempts(store, "extract", 1, ok=2, invalid=3, cost=0.5)
    add_attempts(store, "extract", 2, ok=4, invalid=1, cost=2.0)
    add_attempts(store, "classify", 1, ok=6, cost=0.25)
    snap = read_snapshot(store, window=10_000)
    assert snap.tiers["extract"][1] == TierStats(attempts=15, passes=3, cost_usd=7.5)
    assert snap.tiers["extract"][2] == TierStats(attempts=5, passes=4, cost_usd=10.0)
    assert snap.tiers["classify"][1].pass_rate == 1.0
    assert snap.mean_tokens["extract"] == (1000.0, 100.0)
    # The window is the most recent answered attempts: the 10 old ones fall out.
    recent = read_snapshot(store, window=16)
    assert recent.tiers["extract"][1] == TierStats(attempts=5, passes=2, cost_usd=2.5)


def test_statistics_are_cached_for_ttl_seconds() -> None:
    now = [100.0]
    store = Store()
    config = parse_config(base_config(cascade={"ttl_s": 10, "min_observations": 5,
                                               "explore_rate": 0}))
    c = Cascade(config, store, clock=lambda: now[0])
    assert c.plan("extract", [1, 2, 3]).skipped == ()
    add_attempts(store, "extract", 1, ok=0, invalid=10)
    add_attempts(store, "extract", 2, ok=10, cost=C2)
    now[0] += 9.0
    assert c.plan("extract", [1, 2, 3]).skipped == ()  # still the cached (empty) view
    assert c.start_index("j1", "extract", [1, 2, 3], 0) == 0
    now[0] += 1.5
    assert c.plan("extract", [1, 2, 3]).skipped == (1,)
    assert c.start_index("j1", "extract", [1, 2, 3], 0) == 1
    # Tier 3 was never tried: its cost is estimated from the task's tokens at its price.
    t3 = c.plan("extract", [1, 2, 3]).tiers[2]
    assert t3.estimated and t3.mean_cost_usd == pytest.approx(C3)
    # A job's own ladder counts: with max_tier=1 there is nothing to skip to.
    assert c.start_index("j1", "extract", [1], 0) == 0
    assert c.escalation_order("j1", "extract", [1, 2, 3], 0) == [1, 2]


def test_disabled_cascade_keeps_the_configured_ladder() -> None:
    store = Store()
    add_attempts(store, "extract", 1, ok=0, invalid=50)
    add_attempts(store, "extract", 2, ok=50, cost=C2)
    config = parse_config(base_config(cascade={"enabled": False, "min_observations": 5}))
    c = Cascade(config, store)
    assert c.plan("extract", [1, 2, 3]).skipped == (1,)  # what it would do, for reports
    assert c.start_index("j", "extract", [1, 2, 3], 0) == 0
    assert c.escalation_order("j", "extract", [1, 2, 3], 0) == [1, 2]


def test_ingestion_starts_jobs_above_a_skipped_tier() -> None:
    store = Store()
    add_attempts(store, "extract", 1, ok=0, invalid=30)
    add_attempts(store, "extract", 2, ok=30, cost=C2)
    config = parse_config(base_config(cascade={"min_observations": 5, "explore_rate": 0}))
    rows: list[dict[str, Any]] = [
        {"id": f"j{i}", "task": task, "ladder": [1, 2, 3], "tier_index": 0, "tier": 1,
         "model": "m1", "provider": "p", "options": {"pin": None}}
        for i, task in enumerate(["extract", "classify", "extract"])]
    assert IngestStart(config, store).apply(rows) == 2
    assert [(r["tier"], r["model"]) for r in rows] == [(2, "m2"), (1, "m1"), (2, "m2")]
    assert rows[0]["options"]["cascade_skipped"] == [1]
    assert "cascade_skipped" not in rows[1]["options"]


# ---- the simulator: per answer kind fail rates ---------------------------------------------


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}


def test_sim_fail_rates_override_fail_rate_per_answer_kind() -> None:
    rates = SimModel.from_dict({"fail_rate": 0.5, "fail_rates": {"json": 1.0, "choices": 0.0}},
                               "m").fail_rates
    assert rates == {"json": 1.0, "choices": 0.0}
    for i in range(50):
        js = generate_answer("m", [{"role": "user", "content": f"Extract name: Ann {i}"}],
                             JSON_FORMAT, 0.5, rates)
        ch = generate_answer("m", [{"role": "user", "content": f"Ticket {i}. Answer with one "
                                                               "of: yes, no."}], None, 0.5, rates)
        assert (js.kind, js.bad) == ("json", True)
        assert (ch.kind, ch.bad, ch.content) in {("choices", False, "yes"),
                                                 ("choices", False, "no")}
    # Kinds it does not name keep fail_rate; without fail_rates nothing changes.
    text = [generate_answer("m", [{"role": "user", "content": f"Say hi {i}"}], None, 0.5, rates)
            for i in range(200)]
    assert 0.35 < sum(a.bad for a in text) / 200 < 0.65
    plain = generate_answer("m", [{"role": "user", "content": "Say hi 1"}], None, 0.5)
    assert plain == generate_answer("m", [{"role": "user", "content": "Say hi 1"}], None, 0.5,
                                    {"json": 1.0})
    assert json.loads(json.dumps(SimModel(fail_rates={"code": 0.3}).to_dict()))[
        "fail_rates"] == {"code": 0.3}


@pytest.mark.parametrize(("rates", "expected"), [
    ({"jsn": 0.5}, "unknown answer kind(s) 'jsn'"),
    ({"json": 2}, "fail_rates.json: must be between 0 and 1"),
    ([0.5], "expected a table of answer kind -> rate"),
])
def test_sim_fail_rates_errors(rates: Any, expected: str) -> None:
    with pytest.raises(SimConfigError) as e:
        SimModel.from_dict({"fail_rates": rates}, "simulator.models.m")
    assert expected in str(e.value)
