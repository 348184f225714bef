"""`Store`: thin, typed access to the tables, the only class that writes SQL."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Engine,
    and_,
    case,
    func,
    or_,
    update,
)
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from batchroute.store.engine import autocommit_engine, get_engine
from batchroute.store.statements import (
    _ATTEMPTS,
    _CLAIM,
    _CLAIM_MANY,
    _JOBS,
    Move,
    _attempt_params,
    _record_and_transition_stmt,
    _record_stmt,
    _transition_stmt,
)
from batchroute.store.tables import (
    BATCHED,
    CANCELLED,
    FAILED,
    FINISHED,
    LOST,
    QUEUED,
    RUNNING,
    Attempt,
    Batch,
    Job,
    LineError,
    lease_seconds,
    utcnow,
)

# The columns of a job an output line reads (Store.output_rows); line_no orders them.
OUTPUT_COLUMNS = ("id", "custom_id", "line_no", "task", "tier", "provider", "model",
                  "escalations", "verdicts", "reference_model", "options", "state", "result",
                  "error")


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
            from sqlalchemy.dialects import postgresql

            stmt: Any = postgresql.insert(table).on_conflict_do_nothing()
        elif dialect == "sqlite":
            from sqlalchemy.dialects import sqlite

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

    def output_rows(self, batch_id: str, chunk: int = 1000) -> Iterator[Any]:
        """What an output line needs of each job (batchroute.results.OutputJob), as plain
        rows in input-line order, `chunk` per query: no ORM objects, and not the request
        bodies (the largest JSON of a job, which writing results never reads)."""
        return self._by_line(_JOBS, OUTPUT_COLUMNS, batch_id, chunk)

    def _by_line(self, table: Any, names: Sequence[str], batch_id: str,
                 page: int) -> Iterator[Any]:
        """A batch's rows of ``table`` (its ``names`` columns, ``line_no`` among them) in
        line order, ``page`` per query: keyset on the unique (batch_id, line_no)."""
        columns = [table.c[name] for name in names]
        last = -1
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(sa_select(*columns).where(
                    table.c.batch_id == batch_id, table.c.line_no > last)
                    .order_by(table.c.line_no).limit(page)).all()
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
        return self._by_line(LineError.__table__,  # type: ignore[attr-defined]
                             ("line_no", "custom_id", "reason"), batch_id, page)

    def count_line_errors(self, batch_id: str) -> int:
        with self.session() as s:
            return int(s.exec(select(func.count()).select_from(LineError)
                              .where(LineError.batch_id == batch_id)).one())

    def attempts(self, batch_id: str) -> list[Attempt]:
        with self.session() as s:
            return list(s.exec(select(Attempt).where(Attempt.batch_id == batch_id)
                               .order_by(Attempt.id)).all())  # type: ignore[arg-type]

    def attempt_rows(self, batch_id: str) -> list[Any]:
        """`attempts` as plain rows (read-only, the same attribute names), for results and
        reports that read every attempt of a batch once: building ORM objects was most of
        their cost (~0.1 ms a row)."""
        with self.engine.connect() as conn:
            return list(conn.execute(sa_select(_ATTEMPTS).where(_ATTEMPTS.c.batch_id == batch_id)
                                     .order_by(_ATTEMPTS.c.id)))

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
