"""The hot path's SQL statements, built once with bind parameters, and `Move` (one
deferred transition)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    bindparam,
    tuple_,
    update,
)
from sqlalchemy.orm import configure_mappers

from batchroute.store.tables import LOST, QUEUED, RUNNING, Attempt, Job

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
    # The dialect's module on first use only: importing sqlalchemy's PostgreSQL dialect
    # costs ~50 ms, which a SQLite run (`batchroute run`, a `submit`) need not pay.
    from sqlalchemy.dialects import postgresql, sqlite

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


