"""Several jobs per Celery message (issue #9): a large publish puts up to 16 jobs in one
`process_jobs` message; the worker claims them in one statement, runs them one after the
other and writes their finishes together. What must hold:

* the sizing rule spreads a batch over many messages before it packs them;
* a chunk message is the message Celery itself writes for that task, ids only;
* a chunk claims only what is still queued at that attempt, and writes every finish,
  guarded and with its attempt row, exactly as the one-job path does;
* one job crashing does not sink the rest; a chunk running past half its lease gives
  the jobs it has not started back; the sweeper's view of the broker reads chunks;
* a real worker runs a chunked batch to the end.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from batchroute import pipeline
from batchroute.dispatch import CeleryDispatcher, max_chunk
from batchroute.publish import MIN_MESSAGES, RedisBulkPublisher, chunk_size, chunks
from batchroute.recovery import RedisBrokerView
from batchroute.runtime import Runtime
from batchroute.store import FAILED, LOST, QUEUED, RUNNING, SUCCEEDED, Move, Store, get_engine

from .test_recovery import CONFIG, Recorder, batch_of, real_attempt


@pytest.fixture
def store(db_url: str) -> Store:
    return Store(get_engine(db_url), lease_s=600)


def runtime(store: Store) -> tuple[Runtime, Recorder]:
    recorder = Recorder()
    return Runtime(CONFIG, store, recorder), recorder


# ---- sizing and the message ----------------------------------------------------------------
def test_small_publishes_stay_one_job_per_message() -> None:
    assert chunk_size(1, 16) == 1
    assert chunk_size(2 * MIN_MESSAGES - 1, 16) == 1  # 511 jobs: 511 messages
    assert chunk_size(768, 16) == 3  # the latency benchmark: 256 messages for 64 threads
    assert chunk_size(3000, 16) == 11
    assert chunk_size(100_000, 16) == 16  # capped
    assert chunk_size(100_000, 1) == 1  # BATCHROUTE_CHUNK_SIZE=1: chunking off
    pairs = [(f"j{i}", 1) for i in range(1000)]
    groups = chunks(pairs, 16)
    assert [p for g in groups for p in g] == pairs and {len(g) for g in groups} == {3, 1}


def test_chunk_size_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHROUTE_CHUNK_SIZE", "4")
    assert max_chunk() == 4
    monkeypatch.setenv("BATCHROUTE_CHUNK_SIZE", "lots")
    with pytest.raises(ValueError, match="BATCHROUTE_CHUNK_SIZE='lots'.*1 turns chunking off"):
        max_chunk()


def test_chunk_message_is_the_message_send_task_writes(redis_url: str) -> None:
    import redis

    from batchroute.broker import CHUNK_TASK

    dispatcher = CeleryDispatcher()
    client = redis.Redis.from_url(redis_url)
    pairs = [["ja", 1], ["jb", 3]]
    dispatcher.app.send_task(CHUNK_TASK, args=[pairs], queue="batchroute.cmp")
    theirs = json.loads(client.rpop("batchroute.cmp"))  # type: ignore[arg-type]
    ours = json.loads(RedisBulkPublisher(dispatcher.app).chunk_message(
        [("ja", 1), ("jb", 3)], "batchroute.cmp"))
    assert base64.b64decode(ours["body"]) == base64.b64decode(theirs["body"])
    varying = {"id", "root_id", "ignore_result"}
    assert {k: v for k, v in ours["headers"].items() if k not in varying} == \
        {k: v for k, v in theirs["headers"].items() if k not in varying}
    assert ours["headers"]["task"] == CHUNK_TASK
    assert ours["headers"]["argsrepr"] == "[[['ja', 1], ['jb', 3]]]"  # Flower: ids only


def test_the_broker_view_reads_the_jobs_inside_chunks(redis_url: str) -> None:
    items = [(f"j{i:04d}", 1, "batchroute.sim") for i in range(600)] + [("lone", 2, "x.q")]
    CeleryDispatcher(max_chunk_size=16).enqueue_many(items)
    import redis

    client = redis.Redis.from_url(redis_url)
    assert client.llen("batchroute.sim") == 300 and client.llen("x.q") == 1  # 2 jobs each
    held = RedisBrokerView(redis_url).held(["batchroute.sim", "x.q"], None)
    assert held == {(j, n) for j, n, _ in items}


# ---- the store's side ------------------------------------------------------------------------
@pytest.mark.integration
def test_claim_many_takes_only_what_is_queued_at_that_attempt(store: Store) -> None:
    ids = batch_of(store, 6)
    assert store.claim(ids[1], 1) is not None  # another message took it
    got = store.claim_many([(ids[4], 1), (ids[0], 1), (ids[1], 1), (ids[2], 2), (ids[3], 1),
                            (ids[3], 1)])
    assert [j.id for j in got] == [ids[4], ids[0], ids[3]]  # message order, each once
    assert all(j.state == RUNNING and j.lease_until is not None for j in got)
    assert got[0].body["messages"][0]["role"] == "user"
    assert store.get_job(ids[2]).state == QUEUED  # type: ignore[union-attr]
    assert store.claim_many([]) == []


@pytest.mark.integration
def test_transition_many_writes_each_move_guarded_with_its_attempt(store: Store) -> None:
    from batchroute.recovery import sweep

    ids = batch_of(store, 4)
    store.claim_many([(i, 1) for i in ids])
    # The runs were given up for dead meanwhile: the sweeper moved every job to attempt 2,
    sweep(store, CONFIG, Recorder(), batch_id="b-test", reclaim_running=True)
    for i in ids[:3]:  # and new runs claimed three of them
        assert store.claim(i, 2) is not None
    store.transition_many([
        Move(ids[0], 2, real_attempt(ids[0], 2, cost=0.5), {"state": SUCCEEDED,
                                                             "result": {"ok": 1}}),
        Move(ids[1], 2, real_attempt(ids[1], 2), {"state": FAILED,
                                                  "error": {"code": "x", "message": "y"}}),
        Move(ids[2], 2, None, {"state": FAILED, "error": {"code": "budget", "message": "z"}}),
        Move(ids[3], 1, real_attempt(ids[3], 1, cost=0.7), {"state": SUCCEEDED}),  # stale
    ])
    jobs = {i: store.get_job(i) for i in ids}
    assert jobs[ids[0]].state == SUCCEEDED and jobs[ids[0]].result == {"ok": 1}  # type: ignore[union-attr]
    assert jobs[ids[0]].finished_at is not None  # type: ignore[union-attr]
    assert jobs[ids[1]].state == FAILED and jobs[ids[2]].state == FAILED  # type: ignore[union-attr]
    assert jobs[ids[3]].state == QUEUED and jobs[ids[3]].attempt_no == 2  # type: ignore[union-attr]
    rows = {(a.job_id, a.attempt_no): a for i in ids for a in store.job_attempts(i)}
    assert rows[(ids[0], 2)].cost_usd == 0.5 and (ids[2], 2) not in rows
    # The late run's bill replaced the sweeper's placeholder; the job did not move.
    assert rows[(ids[3], 1)].outcome == "ok" and rows[(ids[3], 1)].cost_usd == 0.7
    assert all(a.outcome != LOST for a in rows.values() if a.job_id == ids[3])


# ---- the worker's side -------------------------------------------------------------------------
@pytest.mark.integration
def test_a_chunk_runs_its_jobs_and_writes_them_all(store: Store) -> None:
    ids = batch_of(store, 8)
    rt, recorder = runtime(store)
    try:
        assert store.claim(ids[5], 1) is not None  # a duplicate delivery took this one
        out = pipeline.process_chunk(rt, [(i, 1) for i in ids])
    finally:
        rt.close()
    assert out.pop("skipped") == 1 and sum(out.values()) == 7
    finished = [store.get_job(i) for i in ids if i != ids[5]]
    assert all(j is not None and j.state in (SUCCEEDED, QUEUED) for j in finished)
    for job_id in ids:
        if job_id != ids[5]:
            assert [a.attempt_no for a in store.job_attempts(job_id)] == [1]
    # An escalation is written at once and its next message published after it.
    escalated = {j for j, n, _ in recorder.sent}
    assert escalated == {j.id for j in finished if j is not None and j.state == QUEUED}
    assert all(n == 2 for _, n, _ in recorder.sent)


@pytest.mark.integration
def test_one_job_crashing_does_not_sink_the_chunk(store: Store,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ids = batch_of(store, 5)
    real_call = pipeline.call

    def call(client: Any, provider: Any, base_url: str, model: str, body: Any) -> Any:
        if "Is 3 even" in json.dumps(body):
            raise RuntimeError("a bug in an adapter")
        return real_call(client, provider, base_url, model, body)

    monkeypatch.setattr(pipeline, "call", call)
    rt, _ = runtime(store)
    try:
        out = pipeline.process_chunk(rt, [(i, 1) for i in ids])
    finally:
        rt.close()
    assert out["crashed"] == 1 and sum(out.values()) == 5
    states = sorted(store.get_job(i).state for i in ids)  # type: ignore[union-attr]
    assert states.count(RUNNING) == 1  # the sweeper takes it once its lease lapses
    assert sum(len(store.job_attempts(i)) for i in ids) == 4


@pytest.mark.integration
def test_a_slow_chunk_gives_back_the_jobs_it_has_not_started(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(get_engine(db_url), lease_s=0.2)
    ids = batch_of(store, 6)
    rt, recorder = runtime(store)
    real = pipeline.run_claimed

    def slow(rt_: Runtime, job: Any, writes: Any) -> str:
        time.sleep(0.15)  # a slow provider
        return real(rt_, job, writes)

    monkeypatch.setattr(pipeline, "run_claimed", slow)
    try:
        out = pipeline.process_chunk(rt, [(i, 1) for i in ids])
    finally:
        rt.close()
    given = out.pop("given_back")
    assert given == 6 - sum(out.values()) and 1 <= given <= 5
    back = [(j, n) for j, n, _ in recorder.sent if n == 1]
    assert len(back) == given
    assert all(store.get_job(j).state == QUEUED for j, _ in back)  # type: ignore[union-attr]
    assert all(store.job_attempts(j) == [] for j, _ in back)  # nothing spent on them


def test_each_thread_gets_its_own_http_client(tmp_path: Path) -> None:
    store = Store(get_engine(f"sqlite:///{tmp_path / 'c.db'}"))
    rt, _ = runtime(store)
    seen: list[int] = []
    threads = [threading.Thread(target=lambda: seen.extend([id(rt.client), id(rt.client)]))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 3 and seen[0] == seen[1]  # one per thread, kept
    clients = list(rt._clients)
    rt.close()
    assert all(c.is_closed for c in clients)


def test_other_brokers_get_the_same_chunks_through_send_task() -> None:
    """Not Redis (here kombu's in-memory transport, as for RabbitMQ): the same messages,
    built by Celery's send_task."""
    from batchroute.broker import CHUNK_TASK, TASK_NAME, make_celery

    app = make_celery("t")
    app.conf.broker_url = "memory://"
    items = [(f"j{i:03d}", 1, "q.a") for i in range(515)] + [("k", 4, "q.b")]
    CeleryDispatcher(app, max_chunk_size=16).enqueue_many(items)
    got: list[tuple[str, Any]] = []
    with app.connection_for_write() as conn:
        for queue in ("q.a", "q.b"):
            simple = conn.SimpleQueue(queue)
            while simple.qsize():
                msg = simple.get(timeout=1)
                got.append((msg.headers["task"], msg.payload[0]))
                msg.ack()
            simple.close()
    assert [t for t, _ in got].count(CHUNK_TASK) == 257 and got[-1] == (TASK_NAME, ["k", 4])
    flat = [tuple(p) for t, args in got[:-1] for p in (args[0] if t == CHUNK_TASK else [args])]
    assert flat == [(j, n) for j, n, q in items if q == "q.a"]


class _Ledger:
    def __init__(self) -> None:
        self.batches: list[list[Move]] = []
        self.single: list[str] = []

    def transition_many(self, moves: list[Move]) -> None:
        self.batches.append(list(moves))

    def transition(self, job_id: str, *_: Any, **__: Any) -> bool:
        self.single.append(job_id)
        return True


def test_held_finishes_are_written_together_and_never_left_behind() -> None:
    from batchroute.store import Job

    ledger = _Ledger()
    rt: Any = type("Rt", (), {"store": ledger})()
    jobs = [Job.model_construct(id=f"j{i}", attempt_no=1) for i in range(3)]
    writes = pipeline.Writes(rt, defer=True)
    writes.finish(jobs[0], None, state=SUCCEEDED)
    assert not writes.due(0.001) and ledger.batches == []  # a fast call: keep holding
    writes.finish(jobs[1], None, state=SUCCEEDED)
    assert writes.due(0.3)  # a slow call: the chunk is latency-bound, write now
    writes.flush()
    assert [[m.job_id for m in b] for b in ledger.batches] == [["j0", "j1"]]
    writes.finish(jobs[2], None, state=FAILED)
    writes._since -= 1.0  # held for a second by fast calls
    assert writes.due(0.001)
    writes.flush()
    writes.flush()  # nothing held: no empty write
    assert len(ledger.batches) == 2 and ledger.single == []
    pipeline.Writes(rt, defer=False).finish(jobs[0], None, state=SUCCEEDED)
    assert ledger.single == ["j0"] and len(ledger.batches) == 2  # one job: written at once


class _RefusingLedger(_Ledger):
    """A store whose group write fails, and which refuses one job's move on its own."""

    def __init__(self, group_error: Exception, poison: str) -> None:
        super().__init__()
        self.group_error, self.poison = group_error, poison

    def transition_many(self, moves: list[Move]) -> None:
        raise self.group_error

    def transition(self, job_id: str, *_: Any, **__: Any) -> bool:
        if job_id == self.poison:
            raise ValueError("a move this store refuses")
        return super().transition(job_id)


def test_a_failed_group_write_writes_each_move_on_its_own() -> None:
    """One move the store refuses used to take every held finish with it (up to 64 in the
    embedded runner): now the others are written one by one. A group write cut by an
    outage (a transient error after the store's own retries) is not retried move by move."""
    from sqlalchemy import exc as sa_exc

    from batchroute.store import Job

    for shared in (False, True):
        ledger = _RefusingLedger(sa_exc.IntegrityError("INSERT", {}, Exception("unique")), "j2")
        rt: Any = type("Rt", (), {"store": ledger})()
        writes = pipeline.SharedWrites(rt) if shared else pipeline.Writes(rt, defer=True)
        for i in range(5):
            writes.finish(Job.model_construct(id=f"j{i}", attempt_no=1), None, state=SUCCEEDED)
        writes.flush()
        assert ledger.single == ["j0", "j1", "j3", "j4"] and writes.pending == []
    gone = sa_exc.OperationalError("UPDATE", {}, Exception("server closed the connection"))
    ledger = _RefusingLedger(gone, "none")
    rt = type("Rt", (), {"store": ledger})()
    writes = pipeline.Writes(rt, defer=True)
    writes.finish(Job.model_construct(id="j0", attempt_no=1), None, state=SUCCEEDED)
    writes.flush()
    assert ledger.single == []  # left to the sweeper at once, as before


def test_shared_writes_group_many_threads_finishes_and_lose_none() -> None:
    """The embedded runner's SharedWrites: finishes from many threads go out in groups
    (at MAX_HELD, after FLUSH_AFTER_S, or on the owner's flush), each move exactly once."""
    from batchroute.store import Job

    ledger = _Ledger()
    rt: Any = type("Rt", (), {"store": ledger})()
    writes = pipeline.SharedWrites(rt)
    writes.FLUSH_AFTER_S = 60.0  # only the count flushes here (threads start slowly)
    n = 4 * writes.MAX_HELD + 5

    def finish(i: int) -> None:
        writes.finish(Job.model_construct(id=f"j{i}", attempt_no=1), None, state=SUCCEEDED)

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    written = [m.job_id for b in ledger.batches for m in b]
    assert len(written) >= 4 * writes.MAX_HELD  # groups went out once full
    writes.flush()  # the rest, when the owner looks
    written = [m.job_id for b in ledger.batches for m in b]
    assert sorted(written) == sorted(f"j{i}" for i in range(n))  # each once, none lost
    assert ledger.single == [] and len(ledger.batches) < n // 8  # in groups
    finish(n)
    assert [m.job_id for b in ledger.batches for m in b] == written  # held: below the cap
    writes._since -= writes.FLUSH_AFTER_S  # ... until it has waited long enough
    finish(n + 1)
    assert [m.job_id for m in ledger.batches[-1]] == [f"j{n}", f"j{n + 1}"]


_FORK_UNDER_A_CONSUMER = """
import sys, time
import kombu
from batchroute.chunkpool import OrderedPool

from queue import Empty

# A consumer that waited and timed out, as `control.inspect()` or a result wait does: its
# BRPOP is still in flight on the pooled connection.
pool = kombu.Connection(sys.argv[1], transport_options={"brpop_timeout": 60}).Pool(limit=1)
conn = pool.acquire(block=True)
try:
    conn.SimpleQueue("batchroute-test-fork-nothing").get(timeout=0.5)
except Empty:
    pass
assert conn.default_channel._in_poll
start = time.monotonic()
with OrderedPool(pow, 2, workers=2) as workers:
    squares = list(workers.map(range(5)))
# Any multiprocessing fork, not only ours (batchroute.forksafe): plain Processes. One
# BRPOP has one reply; with two children, at least one waited for it forever.
import multiprocessing
children = [multiprocessing.get_context("fork").Process(target=time.sleep, args=(0,))
            for _ in range(2)]
for child in children:
    child.start()
for child in children:
    child.join(40)
print(squares, max(c.exitcode if c.exitcode is not None else 99 for c in children),
      round(time.monotonic() - start, 1))
"""


def test_forks_do_not_hang_on_the_parents_broker_consumer(redis_url: str) -> None:
    """kombu's after-fork hook closes inherited pools, and closing a channel with a BRPOP in
    flight reads the parent's socket: a fork under a waiting consumer used to hang the
    ingest until the BRPOP timed out (forever with Celery's reply consumers)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FORK_UNDER_A_CONSUMER, redis_url],
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    squares, exitcode, elapsed = done.stdout.rsplit(" ", 2)
    assert squares == "[1, 2, 4, 8, 16]" and exitcode == "0", done.stdout
    assert float(elapsed) < 20, f"the forked processes waited {elapsed} s for the BRPOP"
