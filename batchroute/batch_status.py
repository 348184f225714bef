"""What `batchroute status` says about a batch: a state that ends, and jobs that are stuck.

The stored ``Batch.state`` is written at moments (ingestion start and end, cancel,
resume), not when the last job of a distributed batch finishes: no single worker knows
it finished the last one. So the state shown is derived on read from the job counts:
a batch whose every job has ended is ``done``. ``Client.enqueue`` batches have no file
and are never "ingesting" from the user's point of view.

A job can also be stuck without anything looking wrong: queued, but its broker message
is gone (Redis restarted without persistence, a publish that failed) and nothing has
touched it for a while. The sweeper republishes such jobs after
BATCHROUTE_STALE_QUEUED_S (600 s) when `celery -A workers beat` runs; `status` shows them
earlier (after BATCHROUTE_STALL_S, 120 s) with the command that moves them on, so a batch
at 1981/2000 with an empty queue does not look healthy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from batchroute.store import FINISHED, Batch, Store, utcnow

DEFAULT_STALL_S = 120.0
CLIENT_SOURCE_PREFIX = "Client."


def stall_seconds() -> float:
    """How long a queued job may go untouched, with no message on the broker, before
    `status` calls it stalled (BATCHROUTE_STALL_S)."""
    return float(os.environ.get("BATCHROUTE_STALL_S") or DEFAULT_STALL_S)


def effective_state(stored: str, source: str, counts: Mapping[str, int]) -> str:
    """The batch state to show, from the stored state and the job counts (pure).

    ``done`` once every job has ended (succeeded, failed or cancelled), ``running`` while
    some have not; a cancelled batch stays ``cancelled`` until resumed; a file batch whose
    ingestion has not finished stays ``ingesting``.
    """
    jobs = sum(counts.values())
    unfinished = jobs - sum(counts.get(s, 0) for s in FINISHED)
    if stored == "cancelled" and unfinished == 0:
        return "cancelled"
    if stored == "ingesting" and not source.startswith(CLIENT_SOURCE_PREFIX):
        return "ingesting"
    if jobs and unfinished == 0:
        return "done"
    if jobs:
        return "running"
    return "empty" if source.startswith(CLIENT_SOURCE_PREFIX) else stored


@dataclass
class Stalls:
    """Jobs of one batch that will not move on by themselves."""

    queued_lost: list[str] = field(default_factory=list)
    """Queued, untouched for stall_s, and their (id, attempt) is on no broker queue."""
    running_lapsed: list[str] = field(default_factory=list)
    """Running, but the worker's lease has ended: the worker is gone."""
    broker_unreadable: bool = False
    stall_s: float = DEFAULT_STALL_S

    @property
    def count(self) -> int:
        return len(self.queued_lost) + len(self.running_lapsed)

    def advice(self, batch_id: str) -> str | None:
        """The command to run, in words; None when nothing is stalled."""
        if not self.count:
            return None
        what = []
        if self.queued_lost:
            what.append(f"{len(self.queued_lost)} queued job(s) untouched for over "
                        f"{self.stall_s:g} s with no message on the broker")
        if self.running_lapsed:
            what.append(f"{len(self.running_lapsed)} running job(s) whose worker's lease "
                        "ended")
        return (f"stalled: {' and '.join(what)}; run `batchroute resume {batch_id}` to move "
                f"them on now (or `batchroute recover {batch_id} --stale-after "
                f"{self.stall_s:g}`), and check that a worker is running "
                "(`celery -A workers worker`) and that `celery -A workers beat` runs the "
                "sweeper")

    def as_dict(self, batch_id: str) -> dict[str, Any]:
        return {"count": self.count, "queued_lost": len(self.queued_lost),
                "running_lapsed": len(self.running_lapsed),
                "job_ids": (self.queued_lost + self.running_lapsed)[:20],
                "stall_s": self.stall_s, "broker_unreadable": self.broker_unreadable,
                "advice": self.advice(batch_id)}


def find_stalls(store: Store, queues: list[str], broker: Any | None,
                batch_id: str, now: datetime | None = None,
                stall_s: float | None = None) -> Stalls:
    """The batch's stalled jobs. ``broker`` is a recovery.BrokerView; None (a broker that
    cannot be inspected) leaves queued jobs out: without seeing the queues, a job waiting
    its turn cannot be told from a lost one."""
    now = now or utcnow()
    stall_s = stall_seconds() if stall_s is None else stall_s
    out = Stalls(stall_s=stall_s)
    out.running_lapsed = [r[0] for r in store.running_jobs(batch_id, lapsed_at=now, limit=1000)]
    old = store.stale_queued(now - timedelta(seconds=stall_s), batch_id, limit=5000)
    if not old:
        return out
    # Every message the broker holds counts, delivered or not: a job held by a live
    # worker (a rate-limit countdown) is waiting, not stalled.
    held = broker.held(sorted(set(queues)), 1e9) if broker is not None else None
    if held is None:
        out.broker_unreadable = True
        return out
    out.queued_lost = [j for j, n, _ in old if (j, n) not in held]
    return out


def status_data(store: Store, batch: Batch) -> dict[str, Any]:
    """The part of `status` read from the store: counts, derived state, bad lines."""
    counts = store.state_counts(batch.id)
    total = sum(counts.values())
    return {"batch_id": batch.id, "name": batch.name,
            "state": effective_state(batch.state, batch.source, counts),
            "stored_state": batch.state, "jobs": total, "counts": counts,
            "done": sum(counts.get(s, 0) for s in FINISHED),
            "bad_lines": [{"line": e.line_no, "custom_id": e.custom_id, "reason": e.reason}
                          for e in store.line_errors(batch.id, limit=100)],
            "bad_line_count": store.count_line_errors(batch.id),
            "provider_batches": provider_batches(store, batch.id)}


def provider_batches(store: Store, batch_id: str) -> dict[str, Any]:
    """The batch's provider batches: how many in each state, and the open ones (what the
    provider says of each, so a user waiting on one sees it is being worked on)."""
    from batchroute.store import provider_batches as spb

    pbs = spb.of_batch(store, batch_id)
    return {**spb.summary(pbs), "open": [
        {"id": pb.id, "provider": pb.provider, "model": pb.model, "state": pb.state,
         "remote_id": pb.remote_id, "remote_status": pb.remote_status, "jobs": pb.jobs,
         "counts": pb.counts, "note": pb.note}
        for pb in pbs if pb.state in spb.OPEN][:50]}
