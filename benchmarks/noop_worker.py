"""A bare Celery app with one no-op task, on batchroute's own broker settings (threads
pool, prefetch 1, late acks, JSON): the baseline `worker_bench.py` compares a batchroute
worker with. `celery -A benchmarks.noop_worker worker -Q bench.noop` from the repo root."""

from __future__ import annotations

import os
import time
from typing import Any

from batchroute.broker import make_celery

NOOP_TASK = "bench.noop"
app = make_celery("bench-noop")
_SLEEP_S = float(os.environ.get("BENCH_NOOP_SLEEP_MS") or 0) / 1000


@app.task(name=NOOP_TASK, acks_late=True, ignore_result=True)
def noop(*args: Any) -> None:
    """Takes the same (job id, attempt) arguments as batchroute's task and does nothing
    (or, with BENCH_NOOP_SLEEP_MS, only waits that long: a task as slow as a job, with
    none of its work, to tell Celery's per-task cost at that pace from batchroute's)."""
    if _SLEEP_S:
        time.sleep(_SLEEP_S)
