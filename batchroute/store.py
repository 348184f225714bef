"""The SQL store: the source of truth for batches, jobs and attempts.

The broker only carries (job id, attempt number). Everything else lives here,
so a lost broker message never loses a job, and a duplicated message is
harmless: a worker must *claim* the job for that attempt number with a
conditional UPDATE before it spends anything.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, Engine, UniqueConstraint, event, func, update
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Field, Session, SQLModel, create_engine, select

DEFAULT_DATABASE_URL = "sqlite:///batchroute.db"

# Job states. "queued" means a message for (id, attempt_no) is or should be on the broker.
QUEUED, RUNNING = "queued", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)


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


class Job(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("batch_id", "custom_id"),)

    id: str = Field(primary_key=True)
    batch_id: str = Field(index=True)
    custom_id: str
    line_no: int = 0
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
    prompt_tokens_est: int = 0
    escalations: list[dict[str, Any]] = Field(default_factory=list,
                                              sa_column=Column(JSON, nullable=False))
    verdicts: list[dict[str, Any]] = Field(default_factory=list,
                                           sa_column=Column(JSON, nullable=False))
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    error: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


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
    outcome: str = "ok"  # ok | invalid | error
    error_kind: str | None = None
    reason: str = ""
    request_id: str = ""
    created_at: datetime = Field(default_factory=utcnow)


class LineError(SQLModel, table=True):
    """An input line that could not become a job, kept so `status` and `results` can show it."""

    __table_args__ = (UniqueConstraint("batch_id", "line_no"),)

    id: int | None = Field(default=None, primary_key=True)
    batch_id: str = Field(index=True)
    line_no: int
    custom_id: str | None = None
    reason: str


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def database_url() -> str:
    return os.environ.get("BATCHROUTE_DATABASE_URL") or DEFAULT_DATABASE_URL


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers (status, client waits) run beside the writing workers;
    # busy_timeout makes concurrent writers queue instead of failing.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def get_engine(url: str | None = None) -> Engine:
    """One engine per URL per process, tables created on first use."""
    url = url or database_url()
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            if url.startswith("sqlite"):
                engine = create_engine(url, connect_args={"check_same_thread": False,
                                                          "timeout": 30})
                event.listen(engine, "connect", _sqlite_pragmas)
            else:
                engine = create_engine(url, pool_size=10, max_overflow=40, pool_pre_ping=True)
            SQLModel.metadata.create_all(engine)
            _engines[url] = engine
        return engine


class Store:
    """Thin, typed access to the tables: the only module that writes SQL."""

    def __init__(self, engine: Engine | None = None) -> None:
        self.engine = engine or get_engine()

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # ---- batches -------------------------------------------------------------------------
    def ensure_batch(self, batch_id: str, name: str, source: str) -> Batch:
        with self.session() as s:
            batch = s.get(Batch, batch_id)
            if batch is None:
                batch = Batch(id=batch_id, name=name, source=source)
                s.add(batch)
                s.commit()
            return batch

    def get_batch(self, batch_id: str) -> Batch | None:
        with self.session() as s:
            return s.get(Batch, batch_id)

    def find_batch(self, ref: str) -> Batch | None:
        """A batch by id, by unique id prefix, or by name (most recent)."""
        with self.session() as s:
            batch = s.get(Batch, ref)
            if batch is not None:
                return batch
            rows = s.exec(select(Batch).where(Batch.id.startswith(ref))).all()
            if len(rows) == 1:
                return rows[0]
            named = s.exec(select(Batch).where(Batch.name == ref)
                           .order_by(Batch.created_at.desc())).first()  # type: ignore[attr-defined]
            return named

    def update_batch(self, batch_id: str, **values: Any) -> None:
        with self.session() as s:
            s.execute(update(Batch).where(Batch.id == batch_id).values(**values))  # type: ignore[arg-type]
            s.commit()

    # ---- ingestion -----------------------------------------------------------------------
    def _insert_ignore(self, table: Any, rows: Sequence[dict[str, Any]]) -> int:
        """INSERT .. ON CONFLICT DO NOTHING; returns the rows inserted (exact for one row)."""
        if not rows:
            return 0
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            stmt: Any = postgresql.insert(table).on_conflict_do_nothing()
        elif dialect == "sqlite":
            stmt = sqlite.insert(table).on_conflict_do_nothing()
        else:  # pragma: no cover - other databases are not supported yet
            raise RuntimeError(f"unsupported database dialect {dialect!r}")
        with self.engine.begin() as conn:
            if len(rows) == 1:
                return int(conn.execute(stmt.values(**rows[0])).rowcount)
            return int(conn.execute(stmt, list(rows)).rowcount)

    def insert_jobs(self, rows: Sequence[dict[str, Any]]) -> None:
        """Bulk insert; rows whose (batch, custom_id) exist are skipped, so resubmitting is safe."""
        self._insert_ignore(Job.__table__, rows)  # type: ignore[attr-defined]

    def insert_line_errors(self, rows: Sequence[dict[str, Any]]) -> None:
        self._insert_ignore(LineError.__table__, rows)  # type: ignore[attr-defined]

    def queued_jobs(self, batch_id: str, ids: Iterable[str] | None = None,
                    ) -> list[tuple[str, int, str]]:
        """(id, attempt_no, provider) of a batch's queued jobs, optionally among `ids`."""
        with self.session() as s:
            q = select(Job.id, Job.attempt_no, Job.provider).where(
                Job.batch_id == batch_id, Job.state == QUEUED)
            if ids is not None:
                q = q.where(Job.id.in_(list(ids)))  # type: ignore[attr-defined]
            return [(r[0], r[1], r[2]) for r in s.exec(q).all()]

    # ---- the job life cycle --------------------------------------------------------------
    def claim(self, job_id: str, attempt_no: int) -> Job | None:
        """Take the job for this attempt, or None if another message already did (or it ended)."""
        with self.session() as s:
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.attempt_no == attempt_no,  # type: ignore[arg-type]
                       Job.state == QUEUED)  # type: ignore[arg-type]
                .values(state=RUNNING, updated_at=utcnow())
            )
            s.commit()
            if res.rowcount != 1:  # type: ignore[attr-defined]
                return None
            return s.get(Job, job_id)

    def get_job(self, job_id: str) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def record_attempt(self, attempt: Attempt) -> bool:
        """Insert an attempt once; False if this (job, attempt_no) was already recorded."""
        row = attempt.model_dump(exclude={"id"})
        return self._insert_ignore(Attempt.__table__, [row]) == 1  # type: ignore[attr-defined]

    def attempt_count(self, job_id: str, attempt_no: int | None = None) -> int:
        with self.session() as s:
            q = select(func.count()).select_from(Attempt).where(Attempt.job_id == job_id)
            if attempt_no is not None:
                q = q.where(Attempt.attempt_no == attempt_no)
            return int(s.exec(q).one())

    def transition(self, job_id: str, from_attempt: int, **values: Any) -> bool:
        """Move a running job on (requeue, finish), guarded by its attempt number."""
        values.setdefault("updated_at", utcnow())
        if values.get("state") in FINISHED:
            values.setdefault("finished_at", utcnow())
        with self.session() as s:
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.attempt_no == from_attempt,  # type: ignore[arg-type]
                       Job.state == RUNNING)  # type: ignore[arg-type]
                .values(**values)
            )
            s.commit()
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    # ---- reading -------------------------------------------------------------------------
    def state_counts(self, batch_id: str) -> dict[str, int]:
        with self.session() as s:
            rows = s.exec(select(Job.state, func.count()).where(Job.batch_id == batch_id)
                          .group_by(Job.state)).all()
            return {state: int(n) for state, n in rows}

    def iter_jobs(self, batch_id: str, chunk: int = 1000) -> Iterator[Job]:
        """Jobs in input-line order, read in chunks so a 100k batch is never all in memory."""
        last = -1
        while True:
            with self.session() as s:
                rows = s.exec(select(Job).where(Job.batch_id == batch_id, Job.line_no > last)
                              .order_by(Job.line_no).limit(chunk)).all()  # type: ignore[arg-type]
            if not rows:
                return
            yield from rows
            last = rows[-1].line_no

    def line_errors(self, batch_id: str) -> list[LineError]:
        with self.session() as s:
            return list(s.exec(select(LineError).where(LineError.batch_id == batch_id)
                               .order_by(LineError.line_no)).all())  # type: ignore[arg-type]

    def attempts(self, batch_id: str) -> list[Attempt]:
        with self.session() as s:
            return list(s.exec(select(Attempt).where(Attempt.batch_id == batch_id)
                               .order_by(Attempt.id)).all())  # type: ignore[arg-type]

    def job_attempts(self, job_id: str) -> list[Attempt]:
        with self.session() as s:
            return list(s.exec(select(Attempt).where(Attempt.job_id == job_id)
                               .order_by(Attempt.attempt_no)).all())  # type: ignore[arg-type]

    def job_summaries(self, batch_id: str) -> list[tuple[Any, ...]]:
        """(id, task, state, tier, model, provider, reference_model, n_escalations,
        prompt_tokens_est, metadata) without the bodies, for reports."""
        with self.session() as s:
            rows = s.execute(sa_select(  # type: ignore[call-overload]
                Job.id, Job.task, Job.state, Job.tier, Job.model,
                                       Job.provider, Job.reference_model, Job.escalations,
                                       Job.prompt_tokens_est, Job.options)
                             .where(Job.batch_id == batch_id)).all()
            return [(r[0], r[1], r[2], r[3], r[4], r[5], r[6], len(r[7] or []), r[8],
                     (r[9] or {}).get("metadata", {})) for r in rows]

    def requeue_running(self, batch_id: str) -> int:
        """Put a batch's 'running' jobs back to 'queued' (only safe when no worker holds them)."""
        with self.session() as s:
            res = s.execute(update(Job).where(Job.batch_id == batch_id,  # type: ignore[arg-type]
                                              Job.state == RUNNING)  # type: ignore[arg-type]
                            .values(state=QUEUED, updated_at=utcnow()))
            s.commit()
            return int(res.rowcount)  # type: ignore[attr-defined]
