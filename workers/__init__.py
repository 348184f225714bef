"""The Celery application: `celery -A workers worker` and `celery -A workers flower`.

Queues: one per provider pool (`batchroute.<provider>`), all consumed by default;
start a worker with `-Q batchroute.<provider>` to dedicate it to one pool. The
`batchroute.sweep` queue carries the sweeper that `celery -A workers beat` schedules:
at least one worker must consume it (the default does).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import redis
import structlog
from celery.signals import after_setup_logger, after_setup_task_logger, worker_ready
from kombu import Queue

from batchroute import flower_guard, secrets
from batchroute.breaker import RedisBreakers
from batchroute.broker import (
    CHUNK_TASK,
    PROVIDER_BATCH_TASK,
    SWEEP_QUEUE,
    SWEEP_TASK,
    TASK_NAME,
    broker_eviction_problem,
    broker_url,
    make_celery,
)
from batchroute.budget import RedisBudgets
from batchroute.config import check_api_keys, load_config
from batchroute.dbretry import ResilientStore, retry_task
from batchroute.dispatch import CeleryDispatcher
from batchroute.logs import configure_logging
from batchroute.ratelimit import Limiter
from batchroute.runtime import Runtime

configure_logging()
if "flower" in sys.argv[1:]:  # `celery -A workers flower`: never open without auth (#15)
    flower_guard.install()
config = load_config()
check_api_keys(config)  # fail at start-up, naming the variable, before any job is taken

app = make_celery("batchroute")
app.conf.task_queues = [Queue(p.queue) for p in config.providers.values()] + [Queue(SWEEP_QUEUE)]

_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime() -> Runtime:
    """One Runtime per worker process, built on first use (after any pool fork)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            shared = redis.Redis.from_url(broker_url())  # one pool for breakers and budgets
            # ResilientStore: an attempt's writes wait out a database outage (#15)
            _runtime = Runtime(config, ResilientStore(), CeleryDispatcher(app),
                               breakers=RedisBreakers(shared, config.breaker),
                               # rpm/tpm/concurrency pools shared by every worker (Redis)
                               limiter=Limiter.from_env(config),
                               # budgets reserved before each call, shared by every worker
                               budgets=RedisBudgets(shared))
        return _runtime


@app.task(name=TASK_NAME, acks_late=True, ignore_result=True, bind=True, max_retries=None)
def process_job(self: Any, job_id: str, attempt_no: int) -> str:
    """Arguments are ids only: Flower shows them, so nothing secret or bulky goes here.
    A transient database error re-publishes the message (batchroute.dbretry)."""
    from batchroute.pipeline import process_job as run

    try:
        return run(runtime(), job_id, attempt_no)
    except Exception as e:
        raise retry_task(self, e) from None


@app.task(name=CHUNK_TASK, acks_late=True, ignore_result=True, bind=True, max_retries=None)
def process_jobs(self: Any, pairs: list[list[Any]]) -> dict[str, int]:
    """Several jobs in one message: [[job_id, attempt_no], ...], ids only as above."""
    from batchroute.pipeline import process_chunk

    try:
        return process_chunk(runtime(), [(str(i), int(n)) for i, n in pairs])
    except Exception as e:
        raise retry_task(self, e) from None


@app.task(name=SWEEP_TASK, ignore_result=True)
def sweep() -> dict[str, Any]:
    """Beat's sweeper: dead runs back to the queue, lost messages published again
    (batchroute.recovery). Safe to run on many workers at once: every move is guarded."""
    from batchroute.recovery import broker_view
    from batchroute.recovery import sweep as run_sweep

    rt = runtime()
    return run_sweep(rt.store, config, rt.dispatcher, broker=broker_view(broker_url())).as_dict()


@app.task(name=PROVIDER_BATCH_TASK, ignore_result=True)
def provider_batches() -> dict[str, int]:
    """Beat's provider-batch tick: gather, submit, poll and collect provider batches
    (batchroute.provider_batch.runner). Safe on many workers at once: rows are leased
    and every job move is guarded."""
    from batchroute.provider_batch.runner import tick

    return tick(runtime()).as_dict()


@worker_ready.connect
def _check_broker_eviction(**_: Any) -> None:
    """A Redis that evicts keys loses queued messages: say so loudly at start-up."""
    problem = broker_eviction_problem()
    if problem:
        structlog.get_logger("batchroute.worker").error("broker_may_evict", problem=problem)


@after_setup_logger.connect
@after_setup_task_logger.connect
def _redact_celery_logs(logger: Any = None, **_: Any) -> None:
    """Celery's own log lines (a failed task's traceback, its arguments) get the same
    redaction as ours: no API key reaches a log (batchroute.secrets)."""
    if logger is not None:
        secrets.install_logging_filter(logger)
