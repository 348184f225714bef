"""The worker's hot path, made cheaper without giving up its guarantees (issue #9):

* one statement records the attempt and moves the job on (PostgreSQL: a data-modifying
  CTE in autocommit; SQLite: two statements in one transaction), still exactly once;
* pooled PostgreSQL connections are pinged only after sitting idle, and a dead one is
  replaced without the caller seeing an error;
* a batch budget read a moment ago is trusted to accept a call, never to refuse one;
* a breaker's "closed" is remembered briefly, so a healthy model costs no Redis calls.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from batchroute.breaker import BreakerConfig, RedisBreakers
from batchroute.budget import BudgetConfig, BudgetGuard, BudgetRefused, MemoryBudgets
from batchroute.store import FAILED, LOST, RUNNING, SUCCEEDED, Store, get_engine

from .test_recovery import CONFIG, Recorder, batch_of, real_attempt


@pytest.fixture
def store(db_url: str) -> Store:
    return Store(get_engine(db_url), lease_s=0.05)


@pytest.mark.integration
def test_transition_records_the_attempt_in_the_same_write(store: Store) -> None:
    job_id = batch_of(store, 1)[0]
    assert store.claim(job_id, 1) is not None
    assert store.transition(job_id, 1, real_attempt(job_id, 1, cost=0.25), state=SUCCEEDED,
                            result={"choices": [{"message": {"content": "yes"}}]})
    job = store.get_job(job_id)
    assert job is not None and job.state == SUCCEEDED and job.finished_at is not None
    assert job.result == {"choices": [{"message": {"content": "yes"}}]}  # JSON round trip
    [row] = store.job_attempts(job_id)
    assert (row.attempt_no, row.cost_usd, row.outcome) == (1, 0.25, "ok")
    # A redelivered message's late transition: refused, and the call is not billed twice.
    assert not store.transition(job_id, 1, real_attempt(job_id, 1, cost=0.25), state=FAILED)
    assert len(store.job_attempts(job_id)) == 1
    assert store.get_job(job_id).state == SUCCEEDED  # type: ignore[union-attr]


@pytest.mark.integration
def test_a_refused_transition_still_keeps_the_bill(store: Store) -> None:
    """The sweeper took the job (its lease lapsed) while the call was in flight: the job
    is not moved by the late run, but what the provider billed is on the ledger, replacing
    the sweeper's placeholder."""
    from batchroute.recovery import sweep

    job_id = batch_of(store, 1)[0]
    store.claim(job_id, 1)
    time.sleep(0.1)
    sweep(store, CONFIG, Recorder())
    [placeholder] = store.job_attempts(job_id)
    assert placeholder.outcome == LOST
    assert not store.transition(job_id, 1, real_attempt(job_id, 1, cost=0.5), state=SUCCEEDED)
    [row] = store.job_attempts(job_id)
    assert (row.outcome, row.cost_usd, row.request_id) == ("ok", 0.5, "req-1")
    assert store.get_job(job_id).attempt_no == 2  # type: ignore[union-attr]


@pytest.mark.integration
def test_a_claimed_job_comes_back_whole(store: Store) -> None:
    job_id = batch_of(store, 1)[0]
    job = store.claim(job_id, 1)
    assert job is not None and job.state == RUNNING and job.lease_until is not None
    assert job.body["messages"][0]["role"] == "user" and job.ladder == [1, 2, 3]
    assert store.claim(job_id, 1) is None  # a duplicate message gets nothing


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # pooled server connections
def test_a_dead_pooled_connection_is_replaced_unseen(db_url: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from batchroute.store import engine as store_engine

    from .conftest import _pg_admin

    store = Store(get_engine(db_url), lease_s=60)
    job_id = batch_of(store, 1)[0]
    with store.engine.connect() as conn:  # the pool's connection, then back to the pool
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    _pg_admin(f"SELECT pg_terminate_backend({pid})")  # a server restart, as far as it knows
    monkeypatch.setattr(store_engine, "PING_AFTER_IDLE_S", 0.0)  # it has been idle "long"
    assert store.claim(job_id, 1) is not None  # no OperationalError: pinged and replaced
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid


class CountingLimit:
    def __init__(self, value: float | None) -> None:
        self.value, self.reads = value, 0

    def __call__(self, _batch_id: str) -> float | None:
        self.reads += 1
        return self.value


def test_a_batch_budget_is_read_once_then_trusted_only_to_accept() -> None:
    limit = CountingLimit(1.0)
    guard = BudgetGuard(BudgetConfig(), MemoryBudgets(), limit, lambda _b: 0.0)
    for _ in range(5):
        guard.settle(guard.hold("b", 0.1, False, ttl_s=60), 0.1)
    assert limit.reads == 1  # not one SQL read per attempt
    # Spent 0.5 of 1.0; the operator raises the budget to 10 and resumes. A call the cached
    # budget would refuse re-reads the store first, and goes ahead.
    limit.value = 10.0
    guard.settle(guard.hold("b", 0.9, False, ttl_s=60), 0.9)
    assert limit.reads == 2
    # ... and one the fresh budget refuses is refused, naming the budget.
    with pytest.raises(BudgetRefused, match=r"batch b budget \$10"):
        guard.hold("b", 9.0, False, ttl_s=60)


def test_a_closed_breaker_is_remembered_briefly(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    cfg = BreakerConfig(min_calls=2, window_s=30, cooldown_s=30)
    here = RedisBreakers(r, cfg, closed_ttl_s=0.3)
    elsewhere = RedisBreakers(r, cfg, closed_ttl_s=0.0)  # another worker, no memory
    key = f"hot-path-{time.time_ns()}"
    calls: list[str] = []
    run = here._run

    def counted(*a: Any, **k: Any) -> int:
        calls.append(a[1])
        return run(*a, **k)

    here._run = counted  # type: ignore[method-assign]
    assert here.allow(key) and here.allow(key) and not here.record(key, True)
    assert calls == ["allow"]  # the second allow and the success cost no Redis call
    assert not elsewhere.record(key, False) and elsewhere.record(key, False)  # opened there
    assert not elsewhere.allow(key)
    assert here.allow(key)  # still trusted here, for at most closed_ttl_s ...
    time.sleep(0.35)
    assert not here.allow(key)  # ... then this worker sees the opening too
    # A failure here forgets "closed" at once: the next allow asks Redis.
    key2 = key + "-2"
    assert here.allow(key2)
    calls.clear()
    here.record(key2, False)
    here.allow(key2)
    assert calls == ["record", "allow"]


def test_the_closed_memory_never_outlives_half_the_cooldown() -> None:
    """A success skipped while "closed" is trusted must be one the state machine ignores:
    that holds while the trust is shorter than the cooldown (no open → cooled → probe
    sequence fits inside it)."""
    breakers = RedisBreakers(redis.Redis(), BreakerConfig(cooldown_s=0.2))
    assert breakers.closed_ttl_s == pytest.approx(0.1)
