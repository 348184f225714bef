"""Budgets: reservations that concurrent workers cannot overshoot, and resumable refusals."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from batchroute.budget import (
    BudgetConfig,
    BudgetGuard,
    BudgetRefused,
    MemoryBudgets,
    RedisBudgets,
    fits,
    near_limit,
)
from batchroute.config import load_config
from batchroute.embedded import run_file
from batchroute.store import Store, get_engine

from .conftest import EXAMPLE, wait_for


def test_reservation_math() -> None:
    assert fits(0.5, 0.3, 0.2, 1.0)
    assert not fits(0.5, 0.3, 0.21, 1.0)
    assert near_limit(0.8, 0.05, 0.06, 1.0, 0.9)
    assert not near_limit(0.8, 0.0, 0.05, 1.0, 0.9)


def guard(batch_limit: float | None = None, **cfg: Any) -> BudgetGuard:
    return BudgetGuard(BudgetConfig(**cfg), MemoryBudgets(), lambda _b: batch_limit,
                       lambda _scope: 0.0)


def test_threads_never_reserve_past_the_limit() -> None:
    g = guard(batch_limit=1.0)
    granted: list[int] = []

    def worker() -> None:
        for _ in range(50):
            try:
                g.hold("b", 0.03, escalating=False, ttl_s=60)
                granted.append(1)
            except BudgetRefused:
                pass

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 33  # floor(1.0 / 0.03): not one more, whatever the interleaving


def test_settle_replaces_the_reservation_with_the_actual_cost() -> None:
    g = guard(batch_limit=1.0)
    h = g.hold("b", 0.6, escalating=False, ttl_s=60)
    with pytest.raises(BudgetRefused, match="batch b budget"):
        g.hold("b", 0.6, escalating=False, ttl_s=60)
    g.settle(h, 0.1)
    assert g.status("b") == [{"budget": "batch b", "limit_usd": 1.0, "spent_usd": 0.1,
                              "reserved_usd": 0.0}]
    g.hold("b", 0.6, escalating=False, ttl_s=60)  # fits again now the first call cost less


def test_escalation_stops_near_the_limit_first_attempts_go_on() -> None:
    g = guard(batch_limit=1.0, near_limit=0.5)
    g.settle(g.hold("b", 0.45, escalating=False, ttl_s=60), 0.45)
    with pytest.raises(BudgetRefused, match="escalation to a dearer tier stopped"):
        g.hold("b", 0.1, escalating=True, ttl_s=60)
    g.hold("b", 0.1, escalating=False, ttl_s=60)


def test_project_budget_applies_to_every_batch() -> None:
    g = guard(project_usd=0.5)
    g.settle(g.hold("b1", 0.4, escalating=False, ttl_s=60), 0.4)
    with pytest.raises(BudgetRefused, match="project budget"):
        g.hold("b2", 0.2, escalating=False, ttl_s=60)


def test_counters_start_from_the_sql_ledger() -> None:
    g = BudgetGuard(BudgetConfig(), MemoryBudgets(), lambda _b: 1.0, lambda _scope: 0.95)
    with pytest.raises(BudgetRefused):
        g.hold("b", 0.1, escalating=False, ttl_s=60)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _backends(redis_url: str | None) -> list[tuple[Any, Any]]:
    """(backend, advance(seconds)): memory on a fake clock; Redis on its own clock."""
    clock = _Clock()
    out: list[tuple[Any, Any]] = [(MemoryBudgets(clock),
                                   lambda s: setattr(clock, "now", clock.now + s))]
    if redis_url is not None:
        import time

        import redis

        out.append((RedisBudgets(redis.Redis.from_url(redis_url)), time.sleep))
    return out


def _lease_cases(backend: Any, advance: Any, key: str) -> None:
    zero = lambda: 0.0  # noqa: E731
    # A holder that never settles (killed mid-call): its amount comes back at the lease end.
    assert backend.reserve(key, 0.6, 1.0, zero, "dead", 0.3)
    assert not backend.reserve(key, 0.6, 1.0, zero, "next", 0.3)
    advance(0.45)
    assert backend.usage(key, zero) == (0.0, 0.0)
    assert backend.reserve(key, 0.6, 1.0, zero, "next", 60)
    # The dead holder's settle, late: what it cost is spent; nothing is given back twice.
    backend.settle(key, 0.6, 0.05, zero, "dead")
    spent, reserved = backend.usage(key, zero)
    assert spent == pytest.approx(0.05) and reserved == pytest.approx(0.6)
    # A settle in time gives back exactly its own hold; a second settle of it, nothing.
    backend.settle(key, 0.6, 0.1, zero, "next")
    backend.settle(key, 0.6, 0.0, zero, "next")
    spent, reserved = backend.usage(key, zero)
    assert spent == pytest.approx(0.15) and reserved == pytest.approx(0.0, abs=1e-12)
    # Holds without an id (parked jobs from before leases) settle by amount, as before.
    assert backend.reserve(key, 0.2, 1.0, zero)
    backend.settle(key, 0.2, 0.0, zero)
    assert backend.usage(key, zero)[1] == pytest.approx(0.0, abs=1e-12)


def test_an_unsettled_hold_is_given_back_at_its_lease_end_in_memory() -> None:
    for backend, advance in _backends(None):
        _lease_cases(backend, advance, "batch:m")


@pytest.mark.integration
def test_an_unsettled_hold_is_given_back_at_its_lease_end_in_redis(redis_url: str) -> None:
    backend, advance = _backends(redis_url)[1]
    _lease_cases(backend, advance, "batch:r")


@pytest.mark.integration
def test_a_lease_from_an_extreme_config_is_still_one_redis_can_read(redis_url: str) -> None:
    import redis

    for ttl, grace in ((float("inf"), 120.0), (float("nan"), float("nan")), (1e308, 1e308)):
        g = BudgetGuard(BudgetConfig(batch_usd=1.0, hold_grace_s=grace),
                        RedisBudgets(redis.Redis.from_url(redis_url)), lambda _b: None,
                        lambda _scope: 0.0)
        g.settle(g.hold("x", 0.5, escalating=False, ttl_s=ttl), 0.0)
    assert g.status("x")[0]["reserved_usd"] == pytest.approx(0.0, abs=1e-12)


def test_a_crashed_holder_does_not_shrink_the_project_budget_for_good() -> None:
    """Before leases, every worker killed mid-call left its hold on the project counter,
    until jobs ended `budget_exhausted` with money left."""
    clock = _Clock()
    g = BudgetGuard(BudgetConfig(project_usd=1.0), MemoryBudgets(clock), lambda _b: None,
                    lambda _scope: 0.0)
    for i in range(3):  # three holders die holding 0.3 each
        g.hold(f"b{i}", 0.3, escalating=False, ttl_s=60)
    with pytest.raises(BudgetRefused, match="project budget"):
        g.hold("b9", 0.3, escalating=False, ttl_s=60)
    clock.now += 60 + BudgetConfig().hold_grace_s + 1
    assert g.status("b9")[0]["reserved_usd"] == 0.0
    g.settle(g.hold("b9", 0.3, escalating=False, ttl_s=60), 0.2)
    assert g.status("b9")[0]["spent_usd"] == pytest.approx(0.2)


def test_budget_exhausted_jobs_resume_when_the_budget_is_raised(tmp_path: Path) -> None:
    store = Store(get_engine(f"sqlite:///{tmp_path / 'b.db'}"))
    config = load_config()
    first = run_file(EXAMPLE, tmp_path / "o1.jsonl", tmp_path / "e1.jsonl", config,
                     store=store, budget_usd=0.005)
    r1 = first.report
    exhausted = [j for j in store.iter_jobs(r1["batch_id"])
                 if (j.error or {}).get("code") == "budget_exhausted"]
    assert exhausted, "a $0.005 budget cannot cover 300 jobs"
    attempts = store.attempts(r1["batch_id"])
    max_call = max(a.cost_usd for a in attempts)
    assert r1["cost_usd"] <= 0.005 + max_call
    errs = [json.loads(x) for x in (tmp_path / "e1.jsonl").read_text().splitlines()]
    assert any(e["error"]["code"] == "budget_exhausted" and "raise it" in e["error"]["message"]
               for e in errs)
    done_before = {j.id: len(store.job_attempts(j.id)) for j in store.iter_jobs(r1["batch_id"])
                   if j.state == "succeeded"}

    second = run_file(EXAMPLE, tmp_path / "o2.jsonl", None, config, store=store, budget_usd=1.0)
    r2 = second.report
    assert r2["succeeded"] + r2["failed"] == r2["jobs"]
    assert not [j for j in store.iter_jobs(r2["batch_id"])
                if (j.error or {}).get("code") == "budget_exhausted"]
    for job_id, n in done_before.items():  # finished jobs did not run again
        assert len(store.job_attempts(job_id)) == n


@pytest.mark.integration
def test_concurrent_workers_never_overspend(start_worker: Any, redis_url: str,
                                            tmp_path: Path) -> None:
    from click.testing import CliRunner

    from batchroute.cli import main

    budget = 0.01
    workers = [start_worker(concurrency=16) for _ in range(2)]
    res = CliRunner().invoke(main, ["submit", str(EXAMPLE), "--budget-usd", str(budget),
                                    "--json"])
    assert res.exit_code == 0, res.output
    batch_id, jobs = json.loads(res.stdout)["batch_id"], json.loads(res.stdout)["jobs"]
    store = Store()

    def finished() -> bool:
        c = store.state_counts(batch_id)
        return c.get("succeeded", 0) + c.get("failed", 0) == jobs

    wait_for(finished, 120, "the budgeted batch to end; " + workers[0].log()[-2000:])
    attempts = store.attempts(batch_id)
    spent = sum(a.cost_usd for a in attempts)
    assert spent <= budget + max(a.cost_usd for a in attempts)
    assert store.state_counts(batch_id).get("failed", 0) > 0  # the budget did bind
    import redis

    spent_redis, reserved = RedisBudgets(redis.Redis.from_url(redis_url)).usage(
        f"batch:{batch_id}", lambda: 0.0)
    assert spent_redis == pytest.approx(spent, abs=1e-9)  # counters reconcile to the ledger
    assert reserved == pytest.approx(0.0, abs=1e-12)
