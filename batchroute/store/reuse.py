"""The store's queries for answer reuse (batchroute.reuse_run): part of the store layer,
kept apart from `store` so that module stays readable.

Every query is on the indexed `job.reuse_key`; none walks a batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, exists, func
from sqlalchemy import select as sa_select

from batchroute.store.access import Store
from batchroute.store.tables import BATCHED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job

_CHUNK = 500  # ids per IN (...) list


@dataclass(frozen=True)
class Peers:
    """What the store knows about a job's key, read in one round trip."""

    source: str | None  # a succeeded job with the key, in any batch
    leader: str | None  # the smallest id among the batch's unfinished jobs with the key
    failed_in_batch: bool  # a job of the batch with the key has failed


def _peers_stmt() -> Any:
    """Built once with bind parameters: building and compiling it per call cost more CPU
    than running it (as for the store's hot-path statements)."""
    t = Job.__table__  # type: ignore[attr-defined]
    k = t.c.reuse_key == bindparam("k_key")
    in_batch = t.c.batch_id == bindparam("k_batch")
    source = (sa_select(t.c.id).where(k, t.c.state == SUCCEEDED, t.c.id != bindparam("k_id"))
              .limit(1).scalar_subquery())
    leader = (sa_select(func.min(t.c.id)).where(k, t.c.state.in_((QUEUED, RUNNING, BATCHED)),
                                                in_batch)
              .scalar_subquery())
    failed = exists().where(k, t.c.state == FAILED, in_batch)
    return sa_select(source.label("source"), leader.label("leader"), failed.label("failed"))


_PEERS = _peers_stmt()


def peers(store: Store, key: str, batch_id: str, job_id: str) -> Peers:
    """The job's peers: one statement of three lookups on the index ix_job_reuse; in
    autocommit on PostgreSQL (the store's single-statement engine): one round trip."""
    with store._single.connect() as conn:
        row = conn.execute(_PEERS, {"k_key": key, "k_batch": batch_id, "k_id": job_id}).one()
    return Peers(source=row.source, leader=row.leader, failed_in_batch=bool(row.failed))


@dataclass(frozen=True)
class Source:
    """A succeeded job whose answer is copied."""

    id: str
    batch_id: str
    custom_id: str
    result: dict[str, Any] | None
    verdicts: list[dict[str, Any]]
    tier: int
    model: str
    provider: str
    options: dict[str, Any]
    state: str


def source(store: Store, job_id: str) -> Source | None:
    t = Job.__table__  # type: ignore[attr-defined]
    with store.engine.connect() as conn:
        r = conn.execute(sa_select(t.c.id, t.c.batch_id, t.c.custom_id, t.c.result,
                                   t.c.verdicts, t.c.tier, t.c.model, t.c.provider,
                                   t.c.options, t.c.state).where(t.c.id == job_id)).first()
    if r is None:
        return None
    return Source(id=r.id, batch_id=r.batch_id, custom_id=r.custom_id, result=r.result,
                  verdicts=list(r.verdicts or []), tier=r.tier, model=r.model,
                  provider=r.provider, options=dict(r.options or {}), state=r.state)


def reused_from(store: Store, job_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{job id: its `reused_from` record} for those of `job_ids` that reused an answer."""
    ids = list(job_ids)
    out: dict[str, dict[str, Any]] = {}
    t = Job.__table__  # type: ignore[attr-defined]
    with store.engine.connect() as conn:
        for i in range(0, len(ids), _CHUNK):
            for job_id, options in conn.execute(sa_select(t.c.id, t.c.options).where(
                    t.c.id.in_(ids[i:i + _CHUNK]))):
                info = (options or {}).get("reused_from")
                if isinstance(info, dict):
                    out[job_id] = info
    return out
