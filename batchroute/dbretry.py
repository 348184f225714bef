"""A sick database never loses a message: transient errors are retried, not acknowledged.

Why: with `acks_late` a task that raises is still acknowledged, so a claim that hit
PostgreSQL's `too many clients` (or a restart, a failover, a dropped connection) used to
drop its message, and the job sat until the sweeper's stale threshold (600 s) or its
lease (16 min). Now:

- at the claim (nothing done yet) the Celery task re-publishes itself with a short
  backoff (`retry_task`), freeing the worker thread while the database is away;
- after the claim (the job is ours, only we can finish it) each store call the attempt
  makes is retried in place (`ResilientStore`), so the attempt's outcome is written as
  soon as the database answers again.

Backoffs are capped at MAX_BACKOFF_S so that every job ends within seconds of the
database coming back; the total is bounded by BATCHROUTE_DB_RETRY_S (default 240 s),
after which the error propagates and the sweeper's recovery takes over as before.

Also here: the pool sizes (`pool_options`), small by default so a few worker processes
do not exhaust PostgreSQL's max_connections (100 by default).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
from sqlalchemy import exc as sa_exc

from batchroute.store import Store

log = structlog.get_logger("batchroute.dbretry")

T = TypeVar("T")

DEFAULT_RETRY_S = 240.0
FIRST_BACKOFF_S = 0.25
MAX_BACKOFF_S = 5.0
DEFAULT_POOL_SIZE = 5
DEFAULT_MAX_OVERFLOW = 5

# Messages of errors that pass once the server is back (PostgreSQL, psycopg, SQLite).
_TRANSIENT_TEXT = ("too many clients", "remaining connection slots", "connection refused",
                   "could not connect", "server closed the connection", "terminating connection",
                   "the database system is", "connection reset", "connection timed out",
                   "connection already closed", "connection is closed", "ssl syscall",
                   "broken pipe", "no connection to the server", "database is locked",
                   "cannot connect now", "admin_shutdown", "server conn crashed")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


def retry_budget_s() -> float:
    return _env_float("BATCHROUTE_DB_RETRY_S", DEFAULT_RETRY_S)


def pool_options() -> dict[str, int]:
    """Pool size per engine per process (BATCHROUTE_DB_POOL_SIZE, BATCHROUTE_DB_MAX_OVERFLOW).
    A process has two engines on PostgreSQL (transactional and autocommit), so it opens at
    most 2 × (size + overflow) connections: 20 by default, against 50 × 2 before."""
    return {"pool_size": max(1, int(_env_float("BATCHROUTE_DB_POOL_SIZE", DEFAULT_POOL_SIZE))),
            "max_overflow": max(0, int(_env_float("BATCHROUTE_DB_MAX_OVERFLOW",
                                                   DEFAULT_MAX_OVERFLOW)))}


def is_transient(error: BaseException) -> bool:
    """True for a database error that can pass by itself (server away, full, restarting);
    False for one that will fail the same way again (a constraint, a bad statement)."""
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, sa_exc.DisconnectionError | sa_exc.TimeoutError):
        return True  # TimeoutError: no pooled connection free in pool_timeout
    if isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError):
        text = str(error).lower()
        # SQLite's OperationalError also means "no such table" etc.: only lock waits pass.
        return "sqlite" not in text or "locked" in text or "busy" in text
    text = str(error).lower()
    return any(t in text for t in _TRANSIENT_TEXT) and "sqlalchemy" in type(error).__module__


def backoff_s(retries: int) -> float:
    """The wait before retry number `retries` + 1: doubling from FIRST_BACKOFF_S, capped at
    MAX_BACKOFF_S, with jitter so that many workers do not reconnect in step."""
    nominal = min(FIRST_BACKOFF_S * 2 ** min(retries, 16), MAX_BACKOFF_S)
    return nominal * random.uniform(0.5, 1.0)


def _nominal_total(retries: int) -> float:
    return sum(min(FIRST_BACKOFF_S * 2 ** min(i, 16), MAX_BACKOFF_S) for i in range(retries))


def with_retry(fn: Callable[..., T], *args: Any, what: str = "db", **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, retried on transient database errors until the retry budget
    is spent (then the last error propagates)."""
    deadline = time.monotonic() + retry_budget_s()
    retries = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_transient(e) or time.monotonic() >= deadline:
                raise
            wait = min(backoff_s(retries), max(0.0, deadline - time.monotonic()))
            log.warning("db_transient_error", what=what, retry=retries + 1,
                        wait_s=round(wait, 2), error=f"{type(e).__name__}: {str(e)[:300]}")
            retries += 1
            time.sleep(wait)


class ResilientStore(Store):
    """The store a worker uses: every call an attempt makes once its job is claimed is
    retried through a database outage (the claim itself is not: the task re-publishes
    instead, see `retry_task`)."""

    def transition(self, *args: Any, **kwargs: Any) -> Any:
        return with_retry(super().transition, *args, what="transition", **kwargs)

    def transition_many(self, *args: Any, **kwargs: Any) -> Any:
        return with_retry(super().transition_many, *args, what="transition_many", **kwargs)

    def record_attempt(self, *args: Any, **kwargs: Any) -> Any:
        return with_retry(super().record_attempt, *args, what="record_attempt", **kwargs)

    def put_back(self, *args: Any, **kwargs: Any) -> Any:
        return with_retry(super().put_back, *args, what="put_back", **kwargs)

    def get_job(self, *args: Any, **kwargs: Any) -> Any:
        return with_retry(super().get_job, *args, what="get_job", **kwargs)

    def job_attempts(self, *args: Any, **kwargs: Any) -> Any:
        return with_retry(super().job_attempts, *args, what="job_attempts", **kwargs)

    def attempt_count(self, *args: Any, **kwargs: Any) -> Any:
        return with_retry(super().attempt_count, *args, what="attempt_count", **kwargs)

    def spent_usd(self, *args: Any, **kwargs: Any) -> Any:
        return with_retry(super().spent_usd, *args, what="spent_usd", **kwargs)

    def batch_budget(self, *args: Any, **kwargs: Any) -> Any:
        return with_retry(super().batch_budget, *args, what="batch_budget", **kwargs)

    def tier_stats(self, *args: Any, **kwargs: Any) -> Any:  # the adaptive cascade's view
        return with_retry(super().tier_stats, *args, what="tier_stats", **kwargs)


def retry_task(task: Any, error: BaseException) -> BaseException:
    """What a Celery task should raise for `error`: for a transient database error, the
    task's retry (the message is published again after a backoff, then this one is
    acknowledged: nothing is lost); otherwise, or once BATCHROUTE_DB_RETRY_S is spent,
    the error itself (the sweeper recovers the job). Use as `raise retry_task(self, e)`."""
    if not is_transient(error):
        return error
    retries = int(getattr(task.request, "retries", 0) or 0)
    if _nominal_total(retries) >= retry_budget_s():
        log.error("db_retry_budget_spent", task=task.name, retries=retries,
                  error=f"{type(error).__name__}: {str(error)[:300]}")
        return error
    countdown = backoff_s(retries)
    log.warning("db_transient_error_task_retry", task=task.name, retry=retries + 1,
                countdown_s=round(countdown, 2),
                error=f"{type(error).__name__}: {str(error)[:300]}")
    try:
        task.retry(exc=error, countdown=countdown, max_retries=None)
    except BaseException as retry:  # Celery's Retry (or the broker's error) is what to raise
        return retry
    return error  # pragma: no cover - task.retry always raises
