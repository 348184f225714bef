"""The store's queries for provider batches (batchroute.provider_batch.runner): part of the
store layer, kept apart from `store` so that module stays readable.

Every move of a job is a guarded UPDATE (its state, attempt number and provider batch),
so two ticks working at once, or a tick and a `cancel`, never both move the same job.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, tuple_, update
from sqlalchemy import select as sa_select

from batchroute.store.access import Store
from batchroute.store.tables import (
    BATCHED,
    CANCELLED,
    QUEUED,
    RUNNING,
    Batch,
    Job,
    ProviderBatch,
    utcnow,
)

_JOBS: Any = Job.__table__  # type: ignore[attr-defined]
_PB: Any = ProviderBatch.__table__  # type: ignore[attr-defined]
_CHUNK = 500  # ids per IN (...) list

#: Provider batch states in which a tick still has work to do.
OPEN = ("building", "submitting", "submitted", "collecting")


@dataclass(frozen=True)
class Waiting:
    """A job waiting to be put into a provider batch (no body: the file is built later)."""

    job_id: str
    attempt_no: int
    batch_id: str
    provider: str
    model: str
    prompt_tokens: int
    since: datetime


def waiting(store: Store, limit: int = 200_000) -> list[Waiting]:
    """Jobs in state batched that no provider batch holds yet, oldest first."""
    q = (sa_select(_JOBS.c.id, _JOBS.c.attempt_no, _JOBS.c.batch_id, _JOBS.c.provider,
                   _JOBS.c.model, _JOBS.c.prompt_tokens_est, _JOBS.c.updated_at)
         .where(_JOBS.c.state == BATCHED, _JOBS.c.provider_batch_id.is_(None))
         .order_by(_JOBS.c.updated_at).limit(limit))
    with store.engine.connect() as conn:
        return [Waiting(r[0], int(r[1]), r[2], r[3], r[4], int(r[5] or 0), r[6])
                for r in conn.execute(q).all()]


def busy_batches(store: Store, batch_ids: Sequence[str]) -> set[str]:
    """Those of `batch_ids` that may still send jobs this way soon: still ingesting, or
    with jobs queued or running (a round of escalations or retries is under way)."""
    ids = list(batch_ids)
    if not ids:
        return set()
    busy: set[str] = set()
    b: Any = Batch.__table__  # type: ignore[attr-defined]
    with store.engine.connect() as conn:
        for i in range(0, len(ids), _CHUNK):
            part = ids[i:i + _CHUNK]
            busy.update(r[0] for r in conn.execute(
                sa_select(_JOBS.c.batch_id).distinct()
                .where(_JOBS.c.batch_id.in_(part), _JOBS.c.state.in_((QUEUED, RUNNING)))))
            busy.update(r[0] for r in conn.execute(
                sa_select(b.c.id).where(b.c.id.in_(part), b.c.state == "ingesting",
                                        ~b.c.source.startswith("Client."))))
    return busy


def create(store: Store, row: ProviderBatch, jobs: Sequence[Waiting]) -> int:
    """Store a provider batch and point its jobs at it, in one transaction, before anything
    is uploaded. Returns how many jobs it took (others may have been taken meanwhile); a
    row that took none is not kept."""
    taken = 0
    with store.engine.begin() as conn:
        values = {c.name: getattr(row, c.name) for c in _PB.c}
        conn.execute(_PB.insert().values(values))
        for i in range(0, len(jobs), _CHUNK):
            part = [(j.job_id, j.attempt_no) for j in jobs[i:i + _CHUNK]]
            res = conn.execute(update(_JOBS).where(
                tuple_(_JOBS.c.id, _JOBS.c.attempt_no).in_(part), _JOBS.c.state == BATCHED,
                _JOBS.c.provider_batch_id.is_(None)).values(provider_batch_id=row.id))
            taken += int(res.rowcount)
        if taken:
            conn.execute(update(_PB).where(_PB.c.id == row.id).values(jobs=taken))
        else:
            conn.execute(delete(_PB).where(_PB.c.id == row.id))
    return taken


def due(store: Store, now: datetime) -> list[ProviderBatch]:
    """Open provider batches a tick should look at now: not leased, and (when submitted)
    due for a poll or asked to cancel."""
    q = (sa_select(_PB).where(
        _PB.c.state.in_(OPEN),
        or_(_PB.c.lease_until.is_(None), _PB.c.lease_until < now),
        or_(_PB.c.state != "submitted", _PB.c.next_poll_at.is_(None),
            _PB.c.next_poll_at <= now, _PB.c.cancel_requested.is_(True)))
         .order_by(_PB.c.created_at))
    with store.engine.connect() as conn:
        return [ProviderBatch.model_construct(**r._mapping) for r in conn.execute(q).all()]


def lease(store: Store, pb: ProviderBatch, now: datetime, lease_s: float) -> bool:
    """Take the row for this tick (False: another tick has it, or it moved on)."""
    with store.engine.begin() as conn:
        res = conn.execute(update(_PB).where(
            _PB.c.id == pb.id, _PB.c.state == pb.state,
            or_(_PB.c.lease_until.is_(None), _PB.c.lease_until < now))
            .values(lease_until=now + timedelta(seconds=lease_s)))
        return bool(res.rowcount)


def set_fields(store: Store, pb_id: str, **values: Any) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(_PB).where(_PB.c.id == pb_id).values(**values))


def get(store: Store, pb_id: str) -> ProviderBatch | None:
    with store.session() as s:
        return s.get(ProviderBatch, pb_id)


def summary(pbs: list[ProviderBatch]) -> dict[str, Any]:
    """A batch's provider batches counted (report and `status`): how many, how many
    requests they held, by our state and by the provider's status."""
    return {"count": len(pbs), "requests": sum(p.jobs for p in pbs),
            "by_state": dict(Counter(p.state for p in pbs)),
            "by_status": dict(Counter(p.remote_status for p in pbs if p.remote_status))}


def of_batch(store: Store, batch_id: str) -> list[ProviderBatch]:
    with store.engine.connect() as conn:
        return [ProviderBatch.model_construct(**r._mapping) for r in conn.execute(
            sa_select(_PB).where(_PB.c.batch_id == batch_id).order_by(_PB.c.created_at))]


def request_cancel(store: Store, batch_id: str) -> int:
    """Mark a batch's open provider batches for cancelling (the next tick calls the API)."""
    with store.engine.begin() as conn:
        res = conn.execute(update(_PB).where(_PB.c.batch_id == batch_id,
                                             _PB.c.state.in_(OPEN))
                           .values(cancel_requested=True))
        return int(res.rowcount)


def remote_ids(store: Store, provider: str) -> set[str]:
    """Provider batch ids already recorded for a provider (a lookup must not adopt them)."""
    with store.engine.connect() as conn:
        return {r[0] for r in conn.execute(sa_select(_PB.c.remote_id).where(
            _PB.c.provider == provider, _PB.c.remote_id.is_not(None)))}


def jobs_of(store: Store, pb_id: str, any_state: bool = False) -> list[Job]:
    """The jobs a provider batch still holds (state batched), in line order; with
    `any_state`, also those that left it (cancelled, or already moved on)."""
    q = sa_select(_JOBS).where(_JOBS.c.provider_batch_id == pb_id)
    if not any_state:
        q = q.where(_JOBS.c.state == BATCHED)
    with store.engine.connect() as conn:
        rows = conn.execute(q.order_by(_JOBS.c.line_no)).all()
    return [Job.model_construct(**r._mapping) for r in rows]


def settle_cancelled(store: Store, job_id: str, attempt_no: int, options: dict[str, Any],
                     next_attempt: bool) -> bool:
    """A cancelled job whose provider batch ended: `options` rewritten (its budget note
    gone), and with `next_attempt` moved past the attempt just recorded for it."""
    values: dict[str, Any] = {"options": options}
    if next_attempt:
        values["attempt_no"] = attempt_no + 1
    with store.engine.begin() as conn:
        res = conn.execute(update(_JOBS).where(
            _JOBS.c.id == job_id, _JOBS.c.attempt_no == attempt_no,
            _JOBS.c.state == CANCELLED).values(**values))
        return bool(res.rowcount)


def release(store: Store, pb_id: str, job_ids: Sequence[str]) -> int:
    """Give jobs back to the waiting pool (they did not fit this provider batch)."""
    n = 0
    with store.engine.begin() as conn:
        for i in range(0, len(job_ids), _CHUNK):
            res = conn.execute(update(_JOBS).where(
                _JOBS.c.id.in_(list(job_ids[i:i + _CHUNK])), _JOBS.c.state == BATCHED,
                _JOBS.c.provider_batch_id == pb_id).values(provider_batch_id=None,
                                                           updated_at=utcnow()))
            n += int(res.rowcount)
    return n


def claim(store: Store, pb_id: str, pairs: Sequence[tuple[str, int]]) -> list[Job]:
    """Batched → running for the jobs whose results are being recorded: from here on
    the pipeline's guarded transitions move them, exactly as after a synchronous call
    (and a tick killed meanwhile leaves them to the sweeper, as a killed worker does)."""
    now = utcnow()
    out: list[Job] = []
    with store.engine.begin() as conn:
        for i in range(0, len(pairs), _CHUNK):
            part = [tuple(p) for p in pairs[i:i + _CHUNK]]
            rows = conn.execute(update(_JOBS).where(
                tuple_(_JOBS.c.id, _JOBS.c.attempt_no).in_(part), _JOBS.c.state == BATCHED,
                _JOBS.c.provider_batch_id == pb_id)
                .values(state=RUNNING, updated_at=now,
                        lease_until=now + timedelta(seconds=store.lease_s))
                .returning(*_JOBS.c)).all()
            out.extend(Job.model_construct(**r._mapping) for r in rows)
    return out
