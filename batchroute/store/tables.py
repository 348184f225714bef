"""The tables (batches, jobs, attempts, provider batches, bad lines) and the states a job
moves through."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Index,
    UniqueConstraint,
    text,
)
from sqlmodel import Field, SQLModel

# Job states. "queued" means a message for (id, attempt_no) is or should be on the broker.
QUEUED, RUNNING = "queued", "running"
# Waiting for, or inside, a provider batch (batchroute.provider_batch): no broker message;
# the provider-batch tick moves it on. `provider_batch_id` says which one (None: not yet).
BATCHED = "batched"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
# Attempt outcome of a placeholder the sweeper (or cancel) writes for a run that never
# recorded its own row; the run's real row replaces it if it turns out to be alive.
LOST = "lost"
# A claim's lease: longer than the broker's hard task time limit (900 s, batchroute.broker),
# so the sweeper never takes a job from a live attempt. BATCHROUTE_LEASE_S overrides it.
DEFAULT_LEASE_S = 960.0


def lease_seconds() -> float:
    """The lease a claim takes; an env var so tests (and impatient operators) can use seconds."""
    return float(os.environ.get("BATCHROUTE_LEASE_S") or DEFAULT_LEASE_S)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Batch(SQLModel, table=True):
    id: str = Field(primary_key=True)
    name: str = ""
    source: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    total_lines: int = 0
    error_lines: int = 0
    state: str = "ingesting"
    budget_usd: float | None = None  # None: the config's [budget] batch_usd, if any
    # Until when its jobs may wait out outages (batchroute.waiting); None: created + 24 h.
    deadline_at: datetime | None = None
    # Whether its jobs may go through provider batch APIs (None: where the config says so).
    provider_batch: bool | None = None


# Answer reuse looks jobs up by key and state (batchroute.store.reuse). One composite index:
# with a separate index per column, SQLite (no statistics) chose ix_job_state and scanned
# every finished job (9 ms a lookup at 3,000 jobs). Partial: the many jobs that have no
# key (not deterministic, or --no-reuse) cost it nothing on their transitions.
_REUSE_INDEX = Index("ix_job_reuse", "reuse_key", "state", "batch_id",
                     postgresql_where=text("reuse_key IS NOT NULL"),
                     sqlite_where=text("reuse_key IS NOT NULL"))


# Jobs of one provider batch, looked up when it is submitted and when its results come.
_PBATCH_INDEX = Index("ix_job_pbatch", "provider_batch_id",
                      postgresql_where=text("provider_batch_id IS NOT NULL"),
                      sqlite_where=text("provider_batch_id IS NOT NULL"))


class Job(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("batch_id", "custom_id"), _REUSE_INDEX, _PBATCH_INDEX)

    id: str = Field(primary_key=True)
    batch_id: str = Field(index=True)
    custom_id: str
    # BIGINT: Client.enqueue numbers its lines with a microsecond clock (over 2**31).
    line_no: int = Field(default=0, sa_type=BigInteger)
    task: str = "default"
    body: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    options: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    reference_model: str | None = None
    ladder: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    tier_index: int = 0
    tier: int = 1
    model: str = ""
    provider: str = ""
    state: str = Field(default=QUEUED, index=True)
    attempt_no: int = 1
    # Set by claim: past it, a "running" job's worker is presumed dead (batchroute.recovery).
    lease_until: datetime | None = None
    prompt_tokens_est: int = 0
    # Identical deterministic requests share it (batchroute.reuse); None: never reused.
    # Nullable and indexed (_REUSE_INDEX): _add_missing_columns adds both to an older database.
    reuse_key: str | None = Field(default=None, max_length=64)
    escalations: list[dict[str, Any]] = Field(default_factory=list,
                                              sa_column=Column(JSON, nullable=False))
    verdicts: list[dict[str, Any]] = Field(default_factory=list,
                                           sa_column=Column(JSON, nullable=False))
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    error: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    provider_batch_id: str | None = Field(default=None, max_length=64)


class Attempt(SQLModel, table=True):
    """One provider call. Unique per (job, attempt_no): a redelivered message cannot bill twice."""

    __table_args__ = (UniqueConstraint("job_id", "attempt_no"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True)
    batch_id: str = Field(index=True)
    attempt_no: int
    task: str = "default"
    tier: int
    provider: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    outcome: str = "ok"  # ok | invalid | error | lost | reused (batchroute.reuse_run: $0)
    error_kind: str | None = None
    reason: str = ""
    request_id: str = ""
    # Comma-separated doubts about the reply's bill (batchroute.billing): usage_suspect,
    # cost_clamped. Nullable, so older databases gain it in _add_missing_columns.
    flags: str | None = None
    created_at: datetime = Field(default_factory=utcnow)


class ProviderBatch(SQLModel, table=True):
    """One batch at a provider's batch API (batchroute.provider_batch).

    The row, with its jobs pointing at it, is committed before anything is uploaded, and
    `state` says how far it got: building -> submitting -> submitted -> collecting -> done
    (or cancelled). A submitter that dies between "submitting" and storing `remote_id`
    leaves a row the next tick looks up at the provider (by `id` in the batch's metadata,
    or by size and time where the API has no metadata) before it would send it again."""

    __tablename__ = "provider_batch"

    id: str = Field(primary_key=True)
    batch_id: str = Field(index=True)
    provider: str
    model: str
    api: str
    state: str = Field(default="building", index=True)
    jobs: int = 0
    remote_id: str | None = None
    input_file_id: str | None = None
    remote_status: str = ""
    counts: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    note: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    submitting_at: datetime | None = None
    submitted_at: datetime | None = None
    ended_at: datetime | None = None
    next_poll_at: datetime | None = None
    # A tick working on this row holds it until then (several workers run the tick).
    lease_until: datetime | None = None
    cancel_requested: bool = False


class LineError(SQLModel, table=True):
    """An input line that could not become a job, kept so `status` and `results` can show it."""

    __table_args__ = (UniqueConstraint("batch_id", "line_no"),)

    id: int | None = Field(default=None, primary_key=True)
    batch_id: str = Field(index=True)
    line_no: int
    custom_id: str | None = None
    reason: str


