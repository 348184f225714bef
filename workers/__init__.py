"""The Celery application: `celery -A workers worker` and `celery -A workers flower`.

Queues: one per provider pool (`batchroute.<provider>`), all consumed by default;
start a worker with `-Q batchroute.<provider>` to dedicate it to one pool.
"""

from __future__ import annotations

import threading

import redis
from kombu import Queue

from batchroute.breaker import RedisBreakers
from batchroute.broker import TASK_NAME, broker_url, make_celery
from batchroute.config import check_api_keys, load_config
from batchroute.dispatch import CeleryDispatcher
from batchroute.logs import configure_logging
from batchroute.runtime import Runtime
from batchroute.store import Store

configure_logging()
config = load_config()
check_api_keys(config)  # fail at start-up, naming the variable, before any job is taken

app = make_celery("batchroute")
app.conf.task_queues = [Queue(p.queue) for p in config.providers.values()]

_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime() -> Runtime:
    """One Runtime per worker process, built on first use (after any pool fork)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime(config, Store(), CeleryDispatcher(app),
                               breakers=RedisBreakers(redis.Redis.from_url(broker_url()),
                                                      config.breaker))
        return _runtime


@app.task(name=TASK_NAME, acks_late=True, ignore_result=True)
def process_job(job_id: str, attempt_no: int) -> str:
    """Arguments are ids only: Flower shows them, so nothing secret or bulky goes here."""
    from batchroute.pipeline import process_job as run

    return run(runtime(), job_id, attempt_no)
