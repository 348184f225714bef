"""The sweeper, leases, cancel and resume against a real SQLite store, without a broker:
the dispatcher is a recorder, the broker view a fake, so every rule is checked exactly."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Collection, Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import SQLModel, create_engine

from batchroute.broker import BrokerSettingsError, celery_settings, reliability_timeouts
from batchroute.config import Config, load_config
from batchroute.dispatch import LocalDispatcher
from batchroute.embedded import run_file
from batchroute.ingest import ingest_file, ingest_lines
from batchroute.pipeline import process_job
from batchroute.recovery import (
    WORKER_LOST,
    RedisBrokerView,
    cancel_batch,
    resume_batch,
    sweep,
)
from batchroute.runtime import Runtime
from batchroute.store import (
    CANCELLED,
    FAILED,
    FINISHED,
    LOST,
    QUEUED,
    RUNNING,
    Attempt,
    Batch,
    Store,
    get_engine,
    utcnow,
)

from .dedicated_redis import DedicatedRedis, own_broker

CONFIG = load_config()
__all__ = ["own_broker"]  # the fixture, imported for use here


class Recorder:
    """A dispatcher that only remembers what it was asked to publish."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, str]] = []

    def enqueue(self, job_id: str, attempt_no: int, queue: str, delay_s: float = 0.0) -> None:
        self.sent.append((job_id, attempt_no, queue))

    def enqueue_many(self, items: Sequence[tuple[str, int, str]]) -> None:
        self.sent.extend(items)


class FakeBroker:
    def __init__(self, held: set[tuple[str, int]] | None) -> None:
        self._held = held
        self.calls: list[float | None] = []

    def held(self, queues: Collection[str], fresh_s: float | None) -> set[tuple[str, int]] | None:
        self.calls.append(fresh_s)
        return self._held


def lines(n: int) -> Iterator[tuple[int, bytes]]:
    for i in range(1, n + 1):
        yield i, json.dumps({"custom_id": f"r-{i}", "body": {"messages": [
            {"role": "user", "content": f"Is {i} even? Answer with one of: yes, no."}]},
            "batchroute": {"task": "classify"}}).encode()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(get_engine(f"sqlite:///{tmp_path / 'r.db'}"), lease_s=0.05)


def batch_of(store: Store, n: int = 10, batch_id: str = "b-test") -> list[str]:
    store.ensure_batch(batch_id, batch_id, "test")
    ingest_lines(CONFIG, store, None, batch_id, lines(n))
    return [j.id for j in store.iter_jobs(batch_id)]


def attempt_nos(store: Store, job_id: str) -> list[int]:
    return [a.attempt_no for a in store.job_attempts(job_id)]


def real_attempt(job_id: str, n: int, cost: float = 0.001) -> Attempt:
    return Attempt(job_id=job_id, batch_id="b-test", attempt_no=n, tier=1, provider="sim",
                   model="sim-small", cost_usd=cost, outcome="ok", request_id=f"req-{n}")


def local_runtime(store: Store, config: Config = CONFIG) -> tuple[Runtime, LocalDispatcher]:
    dispatcher = LocalDispatcher(concurrency=8)
    rt = Runtime(config, store, dispatcher)
    dispatcher.handler = lambda job_id, attempt_no: process_job(rt, job_id, attempt_no)
    return rt, dispatcher


# ---- settings ----------------------------------------------------------------------------
def test_reliability_settings_hold_together(monkeypatch: pytest.MonkeyPatch) -> None:
    s = celery_settings()
    assert s["task_acks_late"] and s["task_reject_on_worker_lost"]
    assert s["worker_prefetch_multiplier"] == 1
    assert s["accept_content"] == ["json"] and s["task_serializer"] == "json"
    limit, lease, visibility = reliability_timeouts()
    assert limit < lease < visibility
    assert s["task_time_limit"] == limit
    assert s["broker_transport_options"]["visibility_timeout"] == visibility
    assert s["beat_schedule"]["batchroute-sweep"]["options"]["queue"] == "batchroute.sweep"
    assert s["worker_send_task_events"]  # Flower's task list
    monkeypatch.setenv("BATCHROUTE_TASK_EVENTS", "0")
    assert not celery_settings()["worker_send_task_events"]

    monkeypatch.setenv("BATCHROUTE_LEASE_S", "60")
    with pytest.raises(BrokerSettingsError, match="shorter than the claim lease"):
        celery_settings()
    monkeypatch.setenv("BATCHROUTE_TASK_TIME_LIMIT_S", "30")
    monkeypatch.setenv("BATCHROUTE_VISIBILITY_TIMEOUT_S", "20")
    with pytest.raises(BrokerSettingsError, match="visibility timeout"):
        celery_settings()


# ---- leases and dead runs ----------------------------------------------------------------
def test_claim_takes_a_lease(store: Store) -> None:
    job_id = batch_of(store, 1)[0]
    before = utcnow().replace(tzinfo=None)
    job = store.claim(job_id, 1)
    assert job is not None and job.lease_until is not None
    lease = job.lease_until.replace(tzinfo=None)
    assert before < lease <= before + timedelta(seconds=1)
    assert store.claim(job_id, 1) is None  # a duplicate message claims nothing


def test_dead_run_goes_back_at_a_new_attempt_number_and_its_number_is_kept(store: Store) -> None:
    job_id = batch_of(store, 1)[0]
    assert store.claim(job_id, 1) is not None
    rec = Recorder()
    assert sweep(store, CONFIG, rec).dead_requeued == 0  # lease not over yet
    time.sleep(0.1)
    report = sweep(store, CONFIG, rec)
    assert report.dead_requeued == 1
    assert rec.sent == [(job_id, 2, "batchroute.sim")]
    job = store.get_job(job_id)
    assert job is not None and (job.state, job.attempt_no) == (QUEUED, 2)
    [lost] = store.job_attempts(job_id)
    assert (lost.attempt_no, lost.outcome, lost.error_kind, lost.cost_usd) == (
        1, LOST, WORKER_LOST, 0.0)
    # The requeued attempt runs to the end; the ledger reads 1..n.
    rt, dispatcher = local_runtime(store)
    try:
        dispatcher.enqueue(job_id, 2, "batchroute.sim")
        assert dispatcher.join(30)
    finally:
        dispatcher.close()
        rt.close()
    job = store.get_job(job_id)
    assert job is not None and job.state in FINISHED
    assert attempt_nos(store, job_id) == list(range(1, job.attempt_no + 1))


def test_a_run_presumed_dead_that_was_alive_keeps_its_bill_but_not_the_job(store: Store) -> None:
    job_id = batch_of(store, 1)[0]
    store.claim(job_id, 1)
    time.sleep(0.1)
    sweep(store, CONFIG, Recorder())
    # The slow run now finishes: its real row replaces the placeholder (that call was billed)
    # and its transition is refused (the job has moved on to attempt 2).
    assert store.record_attempt(real_attempt(job_id, 1, cost=0.5))
    [row] = store.job_attempts(job_id)
    assert (row.outcome, row.cost_usd) == ("ok", 0.5)
    assert not store.transition(job_id, 1, state="succeeded")
    # ... and a second record of the same attempt is refused: no call is billed twice.
    assert not store.record_attempt(real_attempt(job_id, 1, cost=0.5))
    assert len(store.job_attempts(job_id)) == 1


def test_a_recorded_attempt_is_never_replaced_by_a_placeholder(store: Store) -> None:
    job_id = batch_of(store, 1)[0]
    store.claim(job_id, 1)
    store.record_attempt(real_attempt(job_id, 1))  # recorded, then the worker died
    time.sleep(0.1)
    assert sweep(store, CONFIG, Recorder()).dead_requeued == 1
    [row] = store.job_attempts(job_id)
    assert row.outcome == "ok" and row.request_id == "req-1"


def test_a_job_that_keeps_killing_workers_fails_with_worker_lost(store: Store) -> None:
    job_id = batch_of(store, 1)[0]
    for n in (1, 2, 3):
        assert store.claim(job_id, n) is not None
        time.sleep(0.1)
        sweep(store, CONFIG, Recorder(), max_lost=3)
    job = store.get_job(job_id)
    assert job is not None and job.state == FAILED
    assert job.error is not None and job.error["code"] == WORKER_LOST
    assert attempt_nos(store, job_id) == [1, 2, 3]


# ---- lost messages -----------------------------------------------------------------------
def test_stale_queued_jobs_are_republished_unless_the_broker_holds_them(store: Store) -> None:
    ids = batch_of(store, 6)
    broker = FakeBroker({(ids[0], 1), (ids[1], 1), (ids[2], 7)})  # 7: an old message
    rec = Recorder()
    report = sweep(store, CONFIG, rec, stale_after_s=60, broker=broker)
    assert report.republished == 0 and rec.sent == []  # not stale yet
    time.sleep(0.05)
    report = sweep(store, CONFIG, rec, stale_after_s=0.01, broker=broker)
    assert report.held_by_broker == 2 and report.republished == 4
    assert sorted(rec.sent) == sorted((i, 1, "batchroute.sim") for i in ids[2:])
    assert broker.calls[-1] == 0.01  # deliveries older than the threshold do not count
    # Republishing touched them: the next sweep leaves them alone for another period.
    assert sweep(store, CONFIG, rec, stale_after_s=1, broker=broker).republished == 0


def test_an_unreadable_broker_means_no_republish(store: Store) -> None:
    batch_of(store, 3)
    time.sleep(0.05)
    rec = Recorder()
    report = sweep(store, CONFIG, rec, stale_after_s=0.01, broker=FakeBroker(None))
    assert report.broker_unreadable and report.republished == 0 and rec.sent == []


def test_two_sweepers_never_both_republish(store: Store) -> None:
    ids = batch_of(store, 5)
    time.sleep(0.05)
    now = utcnow()
    cutoff = now - timedelta(seconds=0.01)
    first = store.touch_queued([(i, 1) for i in ids], now, cutoff)
    second = store.touch_queued([(i, 1) for i in ids], now, cutoff)
    assert len(first) == 5 and second == []


def test_redis_broker_view_reads_queues_and_fresh_deliveries(
        own_broker: DedicatedRedis) -> None:
    import redis

    redis_url = own_broker.url

    from batchroute.dispatch import CeleryDispatcher

    CeleryDispatcher().enqueue_many([("j-a", 1, "batchroute.sim"), ("j-b", 2, "batchroute.sim")])
    client = redis.Redis.from_url(redis_url)
    raw = client.lrange("batchroute.sim", 0, 0)[0]
    # A delivered message sits in kombu's unacked hash, with its delivery time.
    client.hset("unacked", "tag-old", json.dumps([json.loads(raw), "", "batchroute.sim"]))
    client.zadd("unacked_index", {"tag-old": time.time() - 3600})
    view = RedisBrokerView(redis_url)
    assert view.held(["batchroute.sim"], None) == {("j-a", 1), ("j-b", 2)}
    client.lpop("batchroute.sim")  # j-b (the newest) leaves the list: "delivered"
    client.hset("unacked", "tag-new", json.dumps([json.loads(raw), "", "batchroute.sim"]))
    client.zadd("unacked_index", {"tag-new": time.time()})
    assert view.held(["batchroute.sim"], 60) == {("j-a", 1), ("j-b", 2)}
    assert RedisBrokerView(redis_url, max_messages=0).held(["batchroute.sim"], None) is None
    client.delete("batchroute.sim")
    assert view.held(["batchroute.sim"], 60) == {("j-b", 2)}  # the old delivery does not count


# ---- cancel and resume -------------------------------------------------------------------
def test_cancel_then_resume_finishes_every_job_once(store: Store) -> None:
    ids = batch_of(store, 12)
    store.claim(ids[0], 1)  # in flight when the user cancels
    store.claim(ids[1], 1)
    store.record_attempt(real_attempt(ids[1], 1))  # recorded, not yet moved on
    counts = cancel_batch(store, "b-test")
    assert counts == {"cancelled_queued": 10, "cancelled_running": 2,
                      "provider_batches_cancelling": 0}
    assert store.state_counts("b-test") == {CANCELLED: 12}
    # The in-flight call comes back: billed (its row replaces the placeholder), not applied.
    assert store.record_attempt(real_attempt(ids[0], 1, cost=0.2))
    assert not store.transition(ids[0], 1, state="succeeded")
    assert store.claim(ids[5], 1) is None  # queued messages of a cancelled job claim nothing

    rec = Recorder()
    batch = store.get_batch("b-test")
    assert batch is not None and batch.state == "cancelled"
    data = resume_batch(store, CONFIG, rec, batch, broker=FakeBroker(set()))
    assert data["reopened"] == 12 and data["republished"] == 12
    sent = dict((j, n) for j, n, _ in rec.sent)
    assert sent[ids[0]] == 2 and sent[ids[1]] == 2 and sent[ids[5]] == 1

    rt, dispatcher = local_runtime(store)
    try:
        dispatcher.enqueue_many(rec.sent)
        assert dispatcher.join(60)
    finally:
        dispatcher.close()
        rt.close()
    counts2 = store.state_counts("b-test")
    assert sum(counts2.get(s, 0) for s in ("succeeded", "failed")) == 12
    for job_id in ids:
        job = store.get_job(job_id)
        assert job is not None
        assert attempt_nos(store, job_id) == list(range(1, job.attempt_no + 1))
    # Resuming a finished batch runs nothing again.
    rec2 = Recorder()
    batch = store.get_batch("b-test")
    assert batch is not None
    assert resume_batch(store, CONFIG, rec2, batch)["republished"] == 0 and rec2.sent == []


def test_resume_completes_an_ingestion_cut_short(tmp_path: Path, store: Store) -> None:
    src = tmp_path / "batch.jsonl"
    src.write_bytes(b"".join(raw + b"\n" for _, raw in lines(30)))
    from batchroute.ingest import _lines, file_batch_id

    batch_id = file_batch_id(src)
    store.ensure_batch(batch_id, "batch.jsonl", str(src))
    first = [x for x in _lines(src) if x[0] <= 10]
    ingest_lines(CONFIG, store, None, batch_id, first)  # ... and the submitting process died
    batch = store.get_batch(batch_id)
    assert isinstance(batch, Batch) and batch.state == "ingesting"
    rec = Recorder()
    data = resume_batch(store, CONFIG, rec, batch, broker=FakeBroker(set()))
    assert data["ingested"] == 20 and data["republished"] == 30
    assert len({j for j, _, _ in rec.sent}) == 30


def test_embedded_run_resumes_an_interrupted_run(tmp_path: Path) -> None:
    store = Store(get_engine(f"sqlite:///{tmp_path / 'e.db'}"))
    src = tmp_path / "small.jsonl"
    src.write_bytes(b"".join(raw + b"\n" for _, raw in lines(15)))
    ingest = ingest_file(CONFIG, store, None, src)
    ids = [j.id for j in store.iter_jobs(ingest.batch_id)]
    # The previous `batchroute run` was killed: two jobs claimed, one of them had recorded.
    store.claim(ids[0], 1)
    store.claim(ids[1], 1)
    store.record_attempt(Attempt(job_id=ids[1], batch_id=ingest.batch_id, attempt_no=1, tier=1,
                                 provider="sim", model="sim-small", outcome="ok"))
    outcome = run_file(src, tmp_path / "out.jsonl", None, CONFIG, store=store)
    assert outcome.report["succeeded"] + outcome.report["failed"] == 15
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(x["custom_id"] for x in out) == sorted(f"r-{i}" for i in range(1, 16))
    for job_id in ids:
        nos = attempt_nos(store, job_id)
        assert nos == list(range(1, len(nos) + 1))
    assert attempt_nos(store, ids[0])[0] == 1 and store.job_attempts(ids[0])[0].outcome == LOST
    assert store.job_attempts(ids[1])[0].outcome == "ok"


def test_a_database_from_before_leases_gets_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = create_engine(f"sqlite:///{path}")
    SQLModel.metadata.create_all(old)
    old.dispose()
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE job DROP COLUMN lease_until")
    store = Store(get_engine(f"sqlite:///{path}"))
    job_id = batch_of(store, 1)[0]
    job = store.claim(job_id, 1)
    assert job is not None and job.lease_until is not None and job.state == RUNNING
