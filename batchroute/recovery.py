"""Nothing lost: find jobs whose worker or broker message is gone, and move them on.

The SQL store is the truth; the broker only carries (job id, attempt number), and
may forget it (Redis restarted without persistence, a worker SIGKILLed with
messages reserved, a publish that failed after the job row was written). Two
checks restore the invariant "every unfinished job has a live run or a message":

* a ``running`` job whose claim lease has ended lost its worker: it goes back to
  ``queued`` at attempt_no + 1 and is published again. The dead run keeps its
  attempt number: if it recorded its Attempt, that row stays; if not, a ``lost``
  placeholder (cost 0) fills the number, so a job's attempts always read 1..n and
  no (job, attempt) pair is ever billed twice. Should the run turn out to be alive,
  its real row replaces the placeholder and its late transition is refused.
* a ``queued`` job untouched for longer than the stale threshold may have lost its
  message: unless the broker visibly still holds it, the same (id, attempt_no) is
  published again. A duplicate is harmless: the claim is a guarded UPDATE.

The same code serves the Celery beat task (``batchroute.sweep``), ``batchroute
recover``, ``resume`` and the embedded runner. Every step is a guarded UPDATE, so
any number of sweepers may run at once.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import structlog

from batchroute.config import Config
from batchroute.dispatch import Dispatcher
from batchroute.store import (
    CANCELLED,
    FAILED,
    LOST,
    QUEUED,
    Attempt,
    Batch,
    Store,
    provider_batches,
    utcnow,
)

log = structlog.get_logger("batchroute.recovery")

DEFAULT_STALE_QUEUED_S = 600.0
DEFAULT_MAX_LOST = 3
WORKER_LOST = "worker_lost"  # Attempt.error_kind of a placeholder for a dead run
CANCELLED_IN_FLIGHT = "cancelled"  # ... for a run cancelled while its call was in flight
PUBLISH_CHUNK = 1000


def stale_queued_s() -> float:
    """How long a queued job may go untouched before its message is presumed lost.

    Longer than a job normally waits in a healthy queue, so the sweeper rarely
    republishes a message the broker still has (and checks the broker first anyway).
    """
    return float(os.environ.get("BATCHROUTE_STALE_QUEUED_S") or DEFAULT_STALE_QUEUED_S)


def max_lost_runs() -> int:
    """After this many dead runs a job fails with ``worker_lost``: a request that kills its
    worker every time (out of memory, a crash in a C library) must not kill them all."""
    return int(os.environ.get("BATCHROUTE_MAX_LOST") or DEFAULT_MAX_LOST)


@dataclass
class SweepReport:
    dead_requeued: int = 0  # running jobs whose lease ended, queued again at a new attempt
    dead_failed: int = 0  # ... that had died too often and now failed with worker_lost
    republished: int = 0  # queued jobs whose message was presumed lost, published again
    held_by_broker: int = 0  # stale queued jobs left alone: the broker still has them
    broker_unreadable: bool = False  # the broker could not be inspected: nothing republished

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def add(self, other: SweepReport) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value if key != "broker_unreadable"
                    else getattr(self, key) or value)


class BrokerView(Protocol):
    def held(self, queues: Collection[str],
             fresh_s: float | None) -> set[tuple[str, int]] | None:
        """(job id, attempt_no) pairs the broker holds, or None if it cannot tell."""


class RedisBrokerView:
    """What a Redis broker (kombu's transport) still holds for batchroute's queues.

    Reads the queue lists (every priority) and, when `fresh_s` is given, the messages
    delivered to a worker within the last `fresh_s` seconds (kombu's ``unacked`` hash):
    older deliveries may belong to a dead worker and are not counted. Above
    `max_messages` it gives up (None): a broker that full has not lost its data.
    """

    PRIORITY_SEP = "\x06\x16"
    PRIORITY_STEPS = (3, 6, 9)
    PAGE = 5000

    def __init__(self, url: str, max_messages: int = 200_000) -> None:
        self.url = url
        self.max_messages = max_messages

    def held(self, queues: Collection[str],
             fresh_s: float | None) -> set[tuple[str, int]] | None:
        import redis

        pairs: set[tuple[str, int]] = set()
        try:
            client = redis.Redis.from_url(self.url, socket_connect_timeout=5, socket_timeout=30)
            seen = 0
            for queue in queues:
                for key in [queue, *(f"{queue}{self.PRIORITY_SEP}{p}"
                                     for p in self.PRIORITY_STEPS)]:
                    length = int(client.llen(key))
                    seen += length
                    if seen > self.max_messages:
                        return None
                    for start in range(0, length, self.PAGE):
                        for raw in client.lrange(key, start, start + self.PAGE - 1):
                            _add_pair(pairs, raw, unacked=False)
            if fresh_s is not None:
                tags: list[Any] = list(client.zrangebyscore(
                    "unacked_index", time.time() - fresh_s, "+inf"))
                for i in range(0, len(tags), self.PAGE):
                    for entry in client.hmget("unacked", tags[i:i + self.PAGE]):
                        if entry:
                            _add_pair(pairs, entry, unacked=True)
        except redis.RedisError as e:
            log.warning("broker_unreadable", error=str(e))
            return None
        return pairs


def _add_pair(pairs: set[tuple[str, int]], raw: bytes | str, unacked: bool) -> None:
    """Add the (job id, attempt_no) pairs of one kombu message, ignoring anything not ours:
    `process_job`'s args are one pair, `process_jobs`' a list of them. Unacked entries are
    stored as [message, exchange, routing_key]."""
    try:
        msg = json.loads(raw)
        if unacked:
            msg = msg[0]
        body = msg["body"]
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
    except (ValueError, TypeError, KeyError, IndexError):
        return
    if not isinstance(args, list):
        return
    chunk = args[0] if len(args) == 1 and isinstance(args[0], list) else None
    for pair in chunk if chunk is not None else [args]:
        if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) \
                and isinstance(pair[1], int):
            pairs.add((pair[0], pair[1]))


def broker_view(url: str) -> BrokerView | None:
    """A view of the broker at `url`, or None when it cannot be inspected (not Redis)."""
    return RedisBrokerView(url) if url.startswith(("redis://", "rediss://")) else None


def _placeholder(job_id: str, batch_id: str, attempt_no: int, tier: int, model: str,
                 provider: str, kind: str, reason: str) -> Attempt:
    return Attempt(job_id=job_id, batch_id=batch_id, attempt_no=attempt_no, tier=tier,
                   provider=provider, model=model, outcome=LOST, error_kind=kind,
                   reason=reason)


def _take_dead_run(store: Store, row: tuple[str, str, int, int, str, str], now: datetime,
                   max_lost: int, lapsed_only: bool) -> tuple[str, int] | None:
    """Move one running job off its dead run. Returns (action, next attempt) or None if the
    run moved the job itself meanwhile (it was alive after all)."""
    job_id, batch_id, attempt_no, tier, model, provider = row
    jlog = log.bind(batch_id=batch_id, job_id=job_id, attempt=attempt_no)
    store.add_placeholder(_placeholder(
        job_id, batch_id, attempt_no, tier, model, provider, WORKER_LOST,
        "the worker stopped (killed, crashed or cut off) before recording this attempt; "
        "if its call reached the provider, the provider may have billed it"))
    lost = store.lost_runs(job_id, WORKER_LOST)
    if lost >= max_lost:
        moved = store.take_from_run(job_id, attempt_no, now, lapsed_only=lapsed_only,
                                    state=FAILED, error={
                                        "code": WORKER_LOST,
                                        "message": f"the worker running this job stopped "
                                                   f"{lost} times; not retried again"})
        if moved:
            jlog.warning("job_failed_worker_lost", lost_runs=lost)
            return ("failed", attempt_no)
        return None
    moved = store.take_from_run(job_id, attempt_no, now, lapsed_only=lapsed_only,
                                state=QUEUED, attempt_no=attempt_no + 1)
    if moved:
        jlog.warning("dead_run_requeued", next_attempt=attempt_no + 1, lost_runs=lost)
        return ("requeued", attempt_no + 1)
    return None


def sweep(store: Store, config: Config, dispatcher: Dispatcher | None, *,
          batch_id: str | None = None, stale_after_s: float | None = None,
          max_lost: int | None = None, broker: BrokerView | None = None,
          republish_all: bool = False, reclaim_running: bool = False,
          now: datetime | None = None) -> SweepReport:
    """One pass: dead runs back to the queue, lost messages published again.

    `republish_all` (resume) publishes every queued job the broker does not hold, however
    recent; `reclaim_running` (resume --reclaim-running, the embedded runner) treats every
    running job as dead, which is only right when no worker is running it.
    `dispatcher=None` moves jobs in the store without publishing (the caller will).
    """
    now = now or utcnow()
    max_lost = max_lost if max_lost is not None else max_lost_runs()
    stale_after_s = stale_after_s if stale_after_s is not None else stale_queued_s()
    report = SweepReport()
    queue_of = {name: p.queue for name, p in config.providers.items()}

    lapsed_at = None if reclaim_running else now
    while True:
        rows = store.running_jobs(batch_id, lapsed_at=lapsed_at)
        publish: list[tuple[str, int, str]] = []
        moved = 0
        for row in rows:
            taken = _take_dead_run(store, row, now, max_lost, lapsed_only=not reclaim_running)
            if taken is None:
                continue
            action, next_attempt = taken
            moved += 1
            if action == "failed":
                report.dead_failed += 1
            else:
                report.dead_requeued += 1
                publish.append((row[0], next_attempt, queue_of.get(row[5], "")))
        if dispatcher is not None and publish:
            dispatcher.enqueue_many([p for p in publish if p[2]])
        if len(rows) < 5000 or not moved:
            break

    if dispatcher is None:
        return report
    cutoff = None if republish_all else now - timedelta(seconds=stale_after_s)
    stale = store.stale_queued(cutoff, batch_id)
    if not stale:
        return report
    held: set[tuple[str, int]] | None = set()
    if broker is not None:
        # For resume, count only what waits in the queues: a delivery to a worker that died
        # is invisible until the visibility timeout, and a duplicate costs nothing.
        held = broker.held(sorted(set(queue_of.values())),
                           None if republish_all else stale_after_s)
        if held is None and not republish_all:
            report.broker_unreadable = True
            log.warning("sweep_skipped_republish", stale_queued=len(stale),
                        reason="broker could not be inspected or holds too many messages")
            return report
    known = held or set()
    todo = [(j, n, p) for j, n, p in stale if (j, n) not in known]
    report.held_by_broker = len(stale) - len(todo)
    provider_of = {j: p for j, _, p in todo}
    for i in range(0, len(todo), PUBLISH_CHUNK):
        chunk = todo[i:i + PUBLISH_CHUNK]
        won = store.touch_queued([(j, n) for j, n, _ in chunk], now, cutoff)
        items = [(j, n, queue_of[provider_of[j]]) for j, n in won if provider_of[j] in queue_of]
        dispatcher.enqueue_many(items)
        report.republished += len(items)
    if report.republished:
        log.warning("lost_messages_republished", batch_id=batch_id,
                    republished=report.republished, held_by_broker=report.held_by_broker)
    return report


def cancel_batch(store: Store, batch_id: str, now: datetime | None = None) -> dict[str, int]:
    """Stop a batch: queued, running and provider-batched jobs become cancelled; finished
    jobs stay as they are.

    A call already in flight cannot be recalled: it finishes and is billed (its Attempt is
    recorded) but its answer is discarded, since the job no longer accepts it. Running
    jobs move to a new attempt number so a resume never collides with that late row.
    """
    now = now or utcnow()
    store.update_batch(batch_id, state="cancelled")
    queued = running = 0
    while True:
        q = store.cancel_queued(batch_id, now)
        r = 0
        for job_id, bid, attempt_no, tier, model, provider in store.running_jobs(batch_id):
            store.add_placeholder(_placeholder(
                job_id, bid, attempt_no, tier, model, provider, CANCELLED_IN_FLIGHT,
                "batch cancelled while this attempt was in flight; its answer is discarded"))
            if store.take_from_run(job_id, attempt_no, now, lapsed_only=False,
                                   state=CANCELLED, attempt_no=attempt_no + 1,
                                   error={"code": "cancelled",
                                          "message": "batch cancelled by the user"}):
                r += 1
        queued, running = queued + q, running + r
        if not q and not r:
            break
    # Provider batches in flight are cancelled at the provider by the next provider-batch
    # tick; what they had already answered is recorded (billed) with the answer discarded.
    cancelling = provider_batches.request_cancel(store, batch_id)
    log.info("batch_cancelled", batch_id=batch_id, queued=queued, running=running,
             provider_batches=cancelling)
    return {"cancelled_queued": queued, "cancelled_running": running,
            "provider_batches_cancelling": cancelling}


def resume_batch(store: Store, config: Config, dispatcher: Dispatcher, batch: Batch, *,
                 broker: BrokerView | None = None, reclaim_running: bool = False,
                 now: datetime | None = None, budget_usd: float | None = None) -> dict[str, Any]:
    """Finish an interrupted batch without running a finished job again.

    Completes an ingestion that stopped half-way (from the batch's source file, if it is
    still there and unchanged), reopens cancelled jobs, moves runs whose lease ended, and
    publishes every queued job the broker does not hold.
    """
    from batchroute.ingest import file_batch_id, ingest_file

    now = now or utcnow()
    blog = log.bind(batch_id=batch.id)
    notes: list[str] = []
    ingested = 0
    # Client.enqueue batches have no file: they are "ingesting" for as long as they live.
    if batch.state == "ingesting" and not batch.source.startswith("Client."):
        source = Path(batch.source)
        if source.is_file() and file_batch_id(source) == batch.id:
            before = sum(store.state_counts(batch.id).values())
            ingest_file(config, store, None, source, batch.name)
            ingested = sum(store.state_counts(batch.id).values()) - before
        else:
            notes.append(f"ingestion was interrupted and {batch.source!r} is gone or changed: "
                         "lines not yet stored cannot be recovered; submit the file again")
    if budget_usd is not None:  # raised (or lowered) before any job is reopened
        store.update_batch(batch.id, budget_usd=budget_usd)
    reopened_cancelled = store.reopen_cancelled(batch.id, now)
    reopened_budget = store.reopen_budget_exhausted(batch.id, now)
    reopened = reopened_cancelled + reopened_budget
    budget = budget_usd if budget_usd is not None else (
        batch.budget_usd if batch.budget_usd is not None else config.budget.batch_usd)
    if reopened_budget and budget_usd is None and budget is not None:
        notes.append(f"{reopened_budget} job(s) stopped by the budget were reopened under the "
                     f"same budget ${budget:g}: they stop again once it is spent; raise it "
                     "with `batchroute resume BATCH --budget-usd N`")
    report = sweep(store, config, dispatcher, batch_id=batch.id, broker=broker,
                   republish_all=True, reclaim_running=reclaim_running, now=now)
    leased = len(store.running_jobs(batch.id))
    if leased:
        notes.append(f"{leased} job(s) are running under a worker's lease; if that worker is "
                     "gone they come back when the lease ends (or use --reclaim-running "
                     "when no worker is running)")
    store.update_batch(batch.id, state="running")
    blog.info("batch_resumed", ingested=ingested, reopened=reopened, **report.as_dict())
    return {"batch_id": batch.id, "ingested": ingested, "reopened": reopened,
            "reopened_cancelled": reopened_cancelled, "reopened_budget": reopened_budget,
            "budget_usd": budget, "still_running": leased, **report.as_dict(), "notes": notes}


def reclaim_for_local_run(store: Store, config: Config, batch_id: str) -> SweepReport:
    """The embedded runner owns its batch: every running job is an interrupted run, and a
    cancelled job is run again because the user asked for the file to run."""
    store.reopen_cancelled(batch_id, utcnow())
    store.reopen_budget_exhausted(batch_id, utcnow())
    return sweep(store, config, None, batch_id=batch_id, reclaim_running=True)
