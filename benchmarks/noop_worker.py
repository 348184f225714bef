"""A bare Celery app with one no-op task, on batchroute's own broker settings (threads
pool, prefetch 1, late acks, JSON): the baseline `worker_bench.py` compares a batchroute
worker with. `celery -A benchmarks.noop_worker worker -Q bench.noop` from the repo root."""

from __future__ import annotations

from typing import Any

from batchroute.broker import make_celery

NOOP_TASK = "bench.noop"
app = make_celery("bench-noop")


@app.task(name=NOOP_TASK, acks_late=True, ignore_result=True)
def noop(*args: Any) -> None:
    """Takes the same (job id, attempt) arguments as batchroute's task and does nothing."""
