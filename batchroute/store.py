"""The SQL store: the source of truth for batches, jobs and attempts.

The broker only carries (job id, attempt number). Everything else lives here,
so a lost broker message never loses a job, and a duplicated message is
harmless: a worker must *claim* the job for that attempt number with a
conditional UPDATE before it spends anything.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    Engine,
    Index,
    UniqueConstraint,
    and_,
    bindparam,
    case,
    event,
    exc,
    func,
    inspect,
    or_,
    text,
    tuple_,
    update,
)
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import configure_mappers
from sqlmodel import Field, Session, SQLModel, col, create_engine, select

DEFAULT_DATABASE_URL = "sqlite:///batchroute.db"

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


# Answer reuse looks jobs up by key and state (batchroute.store_reuse). One composite index:
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


# A pooled connection idle longer than this is pinged before use (see _ping_if_idle).
PING_AFTER_IDLE_S = 10.0


def _mark_idle(_dbapi_conn: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
    """SQLAlchemy's pool_pre_ping costs a round trip on *every* checkout, i.e. two per
    attempt on a busy worker; a connection used a moment ago is alive, so only one that
    sat idle (where a server restart or a firewall's timeout can have killed it) is
    pinged. A dead one is replaced: raising DisconnectionError makes the pool retry with
    a fresh connection (SQLAlchemy's documented pessimistic-disconnect recipe)."""
    idle_since = record.info.get("idle_since")
    if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
        return
    try:
        cur = dbapi_conn.cursor()
        cur.execute("SELECT 1")
        cur.close()
    except Exception as e:
        raise exc.DisconnectionError(f"pooled connection is dead: {e}") from e


def engine_url(url: str) -> str:
    """The SQLAlchemy URL for a database URL. `postgres://` (what many hosts hand out) and a
    bare `postgresql://` (whose default driver is psycopg 3 since SQLAlchemy 2.1) get the
    driver that is installed: psycopg 3 if present, else psycopg2 (the `postgres` extra)."""
    import importlib.util

    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            driver = "psycopg" if importlib.util.find_spec("psycopg") else "psycopg2"
            return f"postgresql+{driver}://{url[len(prefix):]}"
    return url


def _server_engine(url: Any, **options: Any) -> Engine:
    """An engine for a database server: a pool sized for a worker's threads, whose
    connections are pinged only after sitting idle."""
    from batchroute.dbretry import pool_options  # small pools: see there (#15)

    engine = create_engine(url, **pool_options(), **options)
    event.listen(engine, "checkin", _mark_idle)
    event.listen(engine, "checkout", _ping_if_idle)
    return engine


def autocommit_engine(engine: Engine) -> Engine:
    """A PostgreSQL engine whose connections stay in autocommit, for the hot path's single
    statements. Its own pool rather than ``execution_options(isolation_level=...)`` on the
    shared one: switching a pooled connection to autocommit and back on every checkout
    cost ~40 µs of CPU, a fifth of a whole statement. A chunk's transitions go as one
    executemany: with psycopg2 "values_plus_batch" sends them as pages of statements, one
    round trip per page instead of one per job (each statement is atomic on its own)."""
    key = engine.url.render_as_string(hide_password=False) + "#autocommit"
    with _engines_lock:
        auto = _engines.get(key)
        if auto is None:
            batch = ({"executemany_mode": "values_plus_batch"}
                     if engine.dialect.driver == "psycopg2" else {})
            auto = _server_engine(engine.url, isolation_level="AUTOCOMMIT", **batch)
            _engines[key] = auto
        return auto


# Any constant works; it only has to be the same in every process that creates the schema.
_SCHEMA_LOCK_KEY = 0x62617463  # "batc"


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
                engine = _server_engine(engine_url(url))
            _create_schema(engine)
            _engines[url] = engine
        return engine


def _create_schema(engine: Engine) -> None:
    """Create missing tables and columns in one transaction. On PostgreSQL the first start of
    a deployment runs this in many processes at once (every worker, beat, the submitter) and
    concurrent CREATE TABLEs fail on the catalog's unique index: an advisory lock makes
    them take turns, and the later ones find the tables there."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
        SQLModel.metadata.create_all(conn)
        _add_missing_columns(conn)


def _add_missing_columns(conn: Connection) -> None:
    """create_all() never alters an existing table: add columns that newer versions declare
    (all nullable) so a database written by an older batchroute keeps working."""
    insp = inspect(conn)
    for table in SQLModel.metadata.sorted_tables:
        if not insp.has_table(table.name):
            continue
        have = {c["name"] for c in insp.get_columns(table.name)}
        for column in table.columns:
            if column.name in have or not column.nullable:
                continue
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(text(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}'))
        # Nor does it create the indexes of a table that exists (e.g. ix_job_reuse).
        indexes = {i["name"] for i in insp.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(conn)


# The hot path's statements, built once with bind parameters: building an UPDATE per call
# (coercing every literal, computing its cache key) cost more CPU than psycopg2 did.
_JOBS = Job.__table__  # type: ignore[attr-defined]
# Jobs and attempts are built with model_construct on the hot path, which reads the ORM's
# attribute descriptors: they work only once the mappers are configured, which a Session
# would do lazily and Core never does.
configure_mappers()
_CLAIM = (update(_JOBS)
          .where(_JOBS.c.id == bindparam("k_id"), _JOBS.c.attempt_no == bindparam("k_attempt"),
                 _JOBS.c.state == QUEUED)
          .values(state=RUNNING, updated_at=bindparam("k_now"), lease_until=bindparam("k_lease"))
          .returning(*_JOBS.c))
# The same claim for a chunk message's jobs: (id, attempt_no) row values, one round trip.
_CLAIM_MANY = (update(_JOBS)
               .where(tuple_(_JOBS.c.id, _JOBS.c.attempt_no).in_(bindparam("k_pairs",
                                                                           expanding=True)),
                      _JOBS.c.state == QUEUED)
               .values(state=RUNNING, updated_at=bindparam("k_now"),
                       lease_until=bindparam("k_lease"))
               .returning(*_JOBS.c))


@functools.lru_cache(maxsize=64)
def _transition_stmt(columns: frozenset[str]) -> Any:
    """The guarded UPDATE that moves a running job on, setting `columns` (one per shape)."""
    return (update(_JOBS)
            .where(_JOBS.c.id == bindparam("k_id"), _JOBS.c.attempt_no == bindparam("k_from"),
                   _JOBS.c.state == RUNNING)
            .values({_JOBS.c[c]: bindparam(f"v_{c}") for c in sorted(columns)}))


_ATTEMPTS = Attempt.__table__  # type: ignore[attr-defined]
_ATTEMPT_COLS = tuple(c.name for c in _ATTEMPTS.c if c.name != "id")
_ATTEMPT_KEY = ("job_id", "attempt_no")


@functools.lru_cache(maxsize=4)
def _record_stmt(dialect: str) -> Any:
    """Insert an attempt once per (job, attempt_no); on a clash overwrite only a "lost"
    placeholder (the sweeper gave the run up for dead, but it was alive and its call is
    what the provider billed). One statement: an upsert whose update has a WHERE."""
    module: Any = postgresql if dialect == "postgresql" else sqlite
    ins = module.insert(_ATTEMPTS).values({c: bindparam(f"a_{c}") for c in _ATTEMPT_COLS})
    return ins.on_conflict_do_update(
        index_elements=list(_ATTEMPT_KEY),
        set_={c: ins.excluded[c] for c in _ATTEMPT_COLS if c not in _ATTEMPT_KEY},
        where=_ATTEMPTS.c.outcome == LOST)


@functools.lru_cache(maxsize=64)
def _record_and_transition_stmt(columns: frozenset[str]) -> Any:
    """PostgreSQL: the attempt's upsert as a data-modifying CTE of the job's guarded
    UPDATE. One statement is atomic on its own, so in autocommit it is one round trip
    where INSERT, UPDATE and COMMIT were three."""
    return _transition_stmt(columns).add_cte(_record_stmt("postgresql").cte("recorded"))


def _attempt_params(attempt: Attempt) -> dict[str, Any]:
    return {f"a_{c}": getattr(attempt, c) for c in _ATTEMPT_COLS}


@dataclass
class Move:
    """One deferred `Store.transition`: the job, the attempt it must still be at, the
    attempt row to record with it, and the column values to set."""

    job_id: str
    from_attempt: int
    attempt: Attempt | None
    values: dict[str, Any]


class Store:
    """Thin, typed access to the tables: the only module that writes SQL."""

    def __init__(self, engine: Engine | None = None, lease_s: float | None = None) -> None:
        self.engine = engine or get_engine()
        self.lease_s = lease_s if lease_s is not None else lease_seconds()
        # On PostgreSQL the hot path's writes are single statements, atomic by themselves:
        # run them in autocommit (one round trip each, no BEGIN/COMMIT). SQLite is local.
        self._pg = self.engine.dialect.name == "postgresql"
        self._single = autocommit_engine(self.engine) if self._pg else self.engine

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # ---- batches -------------------------------------------------------------------------
    def ensure_batch(self, batch_id: str, name: str, source: str,
                     budget_usd: float | None = None, deadline_s: float | None = None,
                     provider_batch: bool | None = None) -> Batch:
        """The batch row, created if new; a given budget replaces the batch's (raise it and
        resume to finish jobs that ended `budget_exhausted`), a given deadline (seconds from
        now) replaces its deadline."""
        deadline = utcnow() + timedelta(seconds=deadline_s) if deadline_s else None
        with self.session() as s:
            batch = s.get(Batch, batch_id)
            if batch is None:
                batch = Batch(id=batch_id, name=name, source=source, budget_usd=budget_usd,
                              deadline_at=deadline, provider_batch=provider_batch)
                s.add(batch)
                s.commit()
            elif ((budget_usd is not None and batch.budget_usd != budget_usd) or deadline
                  or (provider_batch is not None and batch.provider_batch != provider_batch)):
                if budget_usd is not None:
                    batch.budget_usd = budget_usd
                if deadline:
                    batch.deadline_at = deadline
                if provider_batch is not None:
                    batch.provider_batch = provider_batch
                s.add(batch)
                s.commit()
            return batch

    def batch_budget(self, batch_id: str) -> float | None:
        batch = self.get_batch(batch_id)
        return batch.budget_usd if batch is not None else None

    def spent_usd(self, batch_id: str | None = None) -> float:
        """What the ledger says was spent, in one batch or in the whole store."""
        with self.session() as s:
            q = select(func.coalesce(func.sum(Attempt.cost_usd), 0.0))
            if batch_id is not None:
                q = q.where(Attempt.batch_id == batch_id)
            return float(s.exec(q).one())

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
        """Take the job for this attempt, or None if another message already did (or it ended).

        The claim is a lease: if the worker dies, the sweeper moves the job on once it lapses.
        """
        now = utcnow()
        # RETURNING: the claimed row comes back with the UPDATE, one round trip instead of
        # two on the hottest path of every attempt; Core rather than an ORM session (no
        # identity map or unit of work for a row nobody keeps): ~1 ms less CPU per attempt.
        with self._single.begin() as conn:
            row = conn.execute(_CLAIM, {"k_id": job_id, "k_attempt": attempt_no, "k_now": now,
                                        "k_lease": now + timedelta(seconds=self.lease_s)}
                               ).first()
        # model_construct: the row is the database's, already typed; validating it again
        # through SQLModel's constructor cost ~60 µs. (So the Job is not ORM-attached:
        # change it with model_construct(...), not setattr.)
        return None if row is None else Job.model_construct(**row._mapping)

    def claim_many(self, pairs: Sequence[tuple[str, int]]) -> list[Job]:
        """`claim` for several (job id, attempt number) pairs in one statement: the jobs
        taken, in the order of `pairs` (those another message took or that ended are left
        out)."""
        if not pairs:
            return []
        now = utcnow()
        with self._single.begin() as conn:
            rows = conn.execute(_CLAIM_MANY, {"k_pairs": [tuple(p) for p in pairs],
                                              "k_now": now,
                                              "k_lease": now + timedelta(seconds=self.lease_s)}
                                ).all()
        by_id = {r.id: Job.model_construct(**r._mapping) for r in rows}
        return [by_id.pop(i) for i, _ in pairs if i in by_id]

    def get_job(self, job_id: str) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def record_attempt(self, attempt: Attempt) -> bool:
        """Insert an attempt once; False if this (job, attempt_no) was already recorded.

        A "lost" placeholder (the sweeper gave the run up for dead) is overwritten: the run
        was alive after all, and its call is what the provider billed.
        """
        # RETURNING, not rowcount: psycopg2 reports -1 for this upsert (it said False on
        # PostgreSQL for every insert).
        stmt = _record_stmt(self.engine.dialect.name).returning(_ATTEMPTS.c.id)
        with self._single.begin() as conn:
            return conn.execute(stmt, _attempt_params(attempt)).first() is not None

    def attempt_count(self, job_id: str, attempt_no: int | None = None) -> int:
        with self.session() as s:
            q = select(func.count()).select_from(Attempt).where(Attempt.job_id == job_id)
            if attempt_no is not None:
                q = q.where(Attempt.attempt_no == attempt_no)
            return int(s.exec(q).one())

    def transition_many(self, moves: Sequence[Move]) -> None:
        """Several `transition`s whose outcome nobody waits for (a chunk's finished jobs),
        in one executemany per statement shape. Each move is still atomic and guarded on
        its own; a guard that fails leaves that job alone and keeps its attempt row."""
        groups: dict[tuple[frozenset[str], bool], list[dict[str, Any]]] = {}
        for move in moves:
            columns, params = self._transition_params(move.job_id, move.from_attempt,
                                                      move.values)
            key = (columns, move.attempt is not None)
            if move.attempt is not None:
                params.update(_attempt_params(move.attempt))
            groups.setdefault(key, []).append(params)
        with self._single.begin() as conn:
            for (columns, with_attempt), rows in groups.items():
                if not with_attempt:
                    conn.execute(_transition_stmt(columns), rows)
                elif self._pg:
                    conn.execute(_record_and_transition_stmt(columns), rows)
                else:  # SQLite: both statements in this one transaction
                    conn.execute(_record_stmt("sqlite"), rows)
                    conn.execute(_transition_stmt(columns), rows)

    @staticmethod
    def _transition_params(job_id: str, from_attempt: int, values: dict[str, Any]
                           ) -> tuple[frozenset[str], dict[str, Any]]:
        """(the columns a transition sets, its bind parameters), timestamps included."""
        now = utcnow()
        values = {"updated_at": now} | values
        if values.get("state") in FINISHED:
            values = {"finished_at": now} | values
        params = {f"v_{k}": v for k, v in values.items()}
        params.update(k_id=job_id, k_from=from_attempt)
        return frozenset(values), params

    def transition(self, job_id: str, from_attempt: int, attempt: Attempt | None = None,
                   **values: Any) -> bool:
        """Move a running job on (requeue, finish), guarded by its attempt number.

        With ``attempt``, the call's ledger row is recorded in the same transaction: one
        commit per attempt instead of two, and never a job moved on without its Attempt.
        The row is kept even when the guard fails (the provider billed the call).
        """
        # A Core UPDATE of the table rather than the ORM's (no session, no evaluation of the
        # criteria against loaded objects): ~20% less CPU per attempt on a busy worker.
        columns, params = self._transition_params(job_id, from_attempt, values)
        with self._single.begin() as conn:
            if attempt is None:
                res = conn.execute(_transition_stmt(columns), params)
            elif self._pg:
                params.update(_attempt_params(attempt))
                res = conn.execute(_record_and_transition_stmt(columns), params)
            else:  # SQLite has no data-modifying CTEs: two statements, one transaction
                conn.execute(_record_stmt("sqlite"), _attempt_params(attempt))
                res = conn.execute(_transition_stmt(columns), params)
            return bool(res.rowcount == 1)

    def put_back(self, job_id: str, attempt_no: int) -> bool:
        """Running → queued at the *same* attempt number: the job waited for rate-limit
        capacity without calling anyone, so it spent no attempt. False if the run no
        longer holds it (then its re-published message must not be sent)."""
        return self.transition(job_id, attempt_no, state=QUEUED)

    # ---- reading -------------------------------------------------------------------------
    def state_counts(self, batch_id: str) -> dict[str, int]:
        with self.session() as s:
            rows = s.exec(select(Job.state, func.count()).where(Job.batch_id == batch_id)
                          .group_by(Job.state)).all()
            return {state: int(n) for state, n in rows}

    def job_counts(self) -> tuple[dict[str, int], list[tuple[str, str, int]]]:
        """Jobs by state in the whole store, and (batch, state, jobs) for the batches that
        still have queued or running jobs (for metrics: finished batches add no labels)."""
        with self.session() as s:
            totals = s.exec(select(Job.state, func.count()).group_by(Job.state)).all()
            active = select(Job.batch_id).where(col(Job.state).in_((QUEUED, RUNNING))).distinct()
            rows = s.exec(select(Job.batch_id, Job.state, func.count())
                          .where(col(Job.batch_id).in_(active))
                          .group_by(Job.batch_id, Job.state)).all()
            return ({state: int(n) for state, n in totals},
                    [(b, state, int(n)) for b, state, n in rows])

    def queued_by_provider(self) -> dict[str, int]:
        """Queued jobs per provider (for metrics: a message may carry several jobs, so the
        queues' lengths alone undercount the work waiting)."""
        with self.session() as s:
            rows = s.exec(select(Job.provider, func.count()).where(Job.state == QUEUED)
                          .group_by(Job.provider)).all()
            return {provider: int(n) for provider, n in rows}

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

    def line_errors(self, batch_id: str, limit: int | None = None) -> list[LineError]:
        """A batch's bad lines in line order; pass `limit` (a file may have a million of
        them), or use iter_line_errors / count_line_errors."""
        with self.session() as s:
            q = (select(LineError).where(LineError.batch_id == batch_id)
                 .order_by(LineError.line_no))  # type: ignore[arg-type]
            return list(s.exec(q if limit is None else q.limit(limit)).all())

    def iter_line_errors(self, batch_id: str, page: int = 5000) -> Iterator[Any]:
        """Bad lines in line order as rows with .line_no, .custom_id and .reason, `page`
        per query (keyset on the unique (batch_id, line_no)): `results` never holds them
        all, and plain rows, not ORM objects, keep a million of them quick."""
        last = -1
        t: Any = LineError.__table__  # type: ignore[attr-defined]
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(sa_select(t.c.line_no, t.c.custom_id, t.c.reason).where(
                    t.c.batch_id == batch_id, t.c.line_no > last)
                    .order_by(t.c.line_no).limit(page)).all()
            if not rows:
                return
            yield from rows
            last = rows[-1].line_no

    def count_line_errors(self, batch_id: str) -> int:
        with self.session() as s:
            return int(s.exec(select(func.count()).select_from(LineError)
                              .where(LineError.batch_id == batch_id)).one())

    def attempts(self, batch_id: str) -> list[Attempt]:
        with self.session() as s:
            return list(s.exec(select(Attempt).where(Attempt.batch_id == batch_id)
                               .order_by(Attempt.id)).all())  # type: ignore[arg-type]

    def job_attempts(self, job_id: str) -> list[Attempt]:
        with self.session() as s:
            return list(s.exec(select(Attempt).where(Attempt.job_id == job_id)
                               .order_by(Attempt.attempt_no)).all())  # type: ignore[arg-type]

    def tier_stats(self, window: int) -> list[tuple[str, int, int, int, float, int, int]]:
        """(task, tier, answered, passed, cost_usd, prompt_tokens, completion_tokens) over the
        last `window` answered attempts (outcome ok or invalid) of all batches, for the
        adaptive cascade (batchroute.adaptive). Walks the primary key backwards, so the cost
        is O(window) however long the ledger grows."""
        recent = (sa_select(col(Attempt.task), col(Attempt.tier), col(Attempt.outcome),
                            col(Attempt.cost_usd), col(Attempt.prompt_tokens),
                            col(Attempt.completion_tokens))
                  .where(col(Attempt.outcome).in_(("ok", "invalid")))
                  .order_by(col(Attempt.id).desc()).limit(window).subquery())
        ok = func.sum(case((recent.c.outcome == "ok", 1), else_=0))
        q = (sa_select(recent.c.task, recent.c.tier, func.count(), ok,
                       func.sum(recent.c.cost_usd), func.sum(recent.c.prompt_tokens),
                       func.sum(recent.c.completion_tokens))
             .group_by(recent.c.task, recent.c.tier))
        with self.session() as s:
            return [(r[0], int(r[1]), int(r[2]), int(r[3] or 0), float(r[4] or 0.0),
                     int(r[5] or 0), int(r[6] or 0)) for r in s.execute(q).all()]

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

    # ---- recovery: leases, lost messages, cancel (the policy is in batchroute.recovery) ----
    def _lapsed(self, now: datetime) -> Any:
        """A lease that ended before `now`; claims made before leases existed (NULL) count
        as ended once they are older than one lease."""
        return or_(col(Job.lease_until) < now,
                   and_(col(Job.lease_until).is_(None),
                        col(Job.updated_at) < now - timedelta(seconds=self.lease_s)))

    def running_jobs(self, batch_id: str | None = None, lapsed_at: datetime | None = None,
                     limit: int = 5000) -> list[tuple[str, str, int, int, str, str]]:
        """(id, batch_id, attempt_no, tier, model, provider) of running jobs; with
        `lapsed_at`, only those whose lease had ended by then."""
        q = sa_select(col(Job.id), col(Job.batch_id), col(Job.attempt_no), col(Job.tier),
                      col(Job.model), col(Job.provider)).where(col(Job.state) == RUNNING)
        if batch_id is not None:
            q = q.where(col(Job.batch_id) == batch_id)
        if lapsed_at is not None:
            q = q.where(self._lapsed(lapsed_at))
        with self.session() as s:
            return [(r[0], r[1], r[2], r[3], r[4], r[5])
                    for r in s.execute(q.order_by(col(Job.updated_at)).limit(limit)).all()]

    def add_placeholder(self, attempt: Attempt) -> bool:
        """Record a "lost" attempt unless the run recorded its own row first (never overwrites)."""
        row = attempt.model_dump(exclude={"id"})
        return self._insert_ignore(Attempt.__table__, [row]) == 1  # type: ignore[attr-defined]

    def take_from_run(self, job_id: str, from_attempt: int, now: datetime, *,
                      lapsed_only: bool, **values: Any) -> bool:
        """Move a running job away from its run (presumed dead, or cancelled), guarded by the
        attempt number and, for the sweeper, by the lease having ended."""
        values.setdefault("updated_at", now)
        values.setdefault("lease_until", None)
        if values.get("state") in FINISHED:
            values.setdefault("finished_at", now)
        q = update(Job).where(col(Job.id) == job_id, col(Job.attempt_no) == from_attempt,
                              col(Job.state) == RUNNING)
        if lapsed_only:
            q = q.where(self._lapsed(now))
        with self.session() as s:
            res = s.execute(q.values(**values))
            s.commit()
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    def lost_runs(self, job_id: str, kind: str) -> int:
        """How many of a job's attempts are placeholders of the given kind (e.g. worker_lost)."""
        with self.session() as s:
            q = select(func.count()).select_from(Attempt).where(
                col(Attempt.job_id) == job_id, col(Attempt.outcome) == LOST,
                col(Attempt.error_kind) == kind)
            return int(s.exec(q).one())

    def stale_queued(self, cutoff: datetime | None, batch_id: str | None = None,
                     limit: int = 20000) -> list[tuple[str, int, str]]:
        """(id, attempt_no, provider) of queued jobs not touched since `cutoff` (None: all)."""
        q = sa_select(col(Job.id), col(Job.attempt_no), col(Job.provider)).where(
            col(Job.state) == QUEUED)
        if batch_id is not None:
            q = q.where(col(Job.batch_id) == batch_id)
        if cutoff is not None:
            q = q.where(col(Job.updated_at) < cutoff)
        with self.session() as s:
            return [(r[0], r[1], r[2])
                    for r in s.execute(q.order_by(col(Job.updated_at)).limit(limit)).all()]

    def touch_queued(self, items: Sequence[tuple[str, int]], now: datetime,
                     cutoff: datetime | None) -> list[tuple[str, int]]:
        """Mark queued jobs as just published; returns those this caller won, so two sweepers
        never both republish the same job."""
        won: list[tuple[str, int]] = []
        with self.session() as s:
            for job_id, attempt_no in items:
                q = update(Job).where(col(Job.id) == job_id,
                                      col(Job.attempt_no) == attempt_no,
                                      col(Job.state) == QUEUED)
                if cutoff is not None:
                    q = q.where(col(Job.updated_at) < cutoff)
                if s.execute(q.values(updated_at=now)).rowcount == 1:  # type: ignore[attr-defined]
                    won.append((job_id, attempt_no))
            s.commit()
        return won

    def cancel_queued(self, batch_id: str, now: datetime) -> int:
        """Queued jobs of a batch (and those waiting for a provider batch) → cancelled;
        their broker messages then claim nothing."""
        with self.session() as s:
            res = s.execute(update(Job).where(col(Job.batch_id) == batch_id,
                                              col(Job.state).in_((QUEUED, BATCHED)))
                            .values(state=CANCELLED, updated_at=now, finished_at=now,
                                    error={"code": "cancelled",
                                           "message": "batch cancelled by the user"}))
            s.commit()
            return int(res.rowcount)  # type: ignore[attr-defined]

    def reopen_budget_exhausted(self, batch_id: str, now: datetime) -> int:
        """Jobs that ended `budget_exhausted` → queued at their next attempt number, so a
        raised budget finishes them (a refused job made no call: nothing is billed twice)."""
        with self.session() as s:
            rows = s.execute(sa_select(col(Job.id), col(Job.attempt_no), col(Job.error)).where(
                col(Job.batch_id) == batch_id, col(Job.state) == FAILED)).all()
            n = 0
            for job_id, attempt_no, error in rows:
                if (error or {}).get("code") != "budget_exhausted":
                    continue
                s.execute(update(Job).where(col(Job.id) == job_id,
                                            col(Job.attempt_no) == attempt_no,
                                            col(Job.state) == FAILED)
                          .values(state=QUEUED, attempt_no=attempt_no + 1, updated_at=now,
                                  finished_at=None, error=None, lease_until=None))
                n += 1
            s.commit()
            return n

    def reopen_cancelled(self, batch_id: str, now: datetime) -> int:
        """Cancelled jobs of a batch → queued again at their current attempt number."""
        with self.session() as s:
            res = s.execute(update(Job).where(col(Job.batch_id) == batch_id,
                                              col(Job.state) == CANCELLED)
                            .values(state=QUEUED, updated_at=now, finished_at=None, error=None,
                                    lease_until=None))
            s.commit()
            return int(res.rowcount)  # type: ignore[attr-defined]
