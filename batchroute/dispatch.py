"""Getting a (job id, attempt number) to a worker: over Celery, or inside this process.

Both dispatchers run the same `pipeline.process_job`, which is what lets the
embedded `batchroute run` behave exactly like the distributed deployment.
"""

from __future__ import annotations

import heapq
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import structlog

from batchroute.broker import CHUNK_TASK, TASK_NAME, make_celery
from batchroute.publish import REDIS_SCHEMES, RedisBulkPublisher, by_queue, chunks

log = structlog.get_logger("batchroute.dispatch")


class Dispatcher(Protocol):
    def enqueue(self, job_id: str, attempt_no: int, queue: str, delay_s: float = 0.0) -> None: ...

    def enqueue_many(self, items: Sequence[tuple[str, int, str]]) -> None: ...


DEFAULT_MAX_CHUNK = 16
# The longest delay either dispatcher accepts (below the broker's 3600 s visibility timeout).
MAX_DELAY_S = 3000.0


def bounded_delay(delay_s: float) -> float:
    """A delay a timer can hold: nan/negative -> 0, inf/huge -> MAX_DELAY_S. A provider's
    Retry-After reaches here; `inf` once overflowed the timer thread's wait and killed it,
    stopping every delayed job of the run."""
    try:
        value = float(delay_s)
    except (TypeError, ValueError):
        return 0.0
    if not value > 0.0:  # also nan
        return 0.0
    return min(value, MAX_DELAY_S)


def max_chunk() -> int:
    """Most jobs one message carries (BATCHROUTE_CHUNK_SIZE, default 16; 1: one job per
    message). More amortises a message's cost further but lengthens a batch's tail: a
    chunk's jobs run one after the other."""
    value = os.environ.get("BATCHROUTE_CHUNK_SIZE") or ""
    try:
        return max(1, int(value)) if value.strip() else DEFAULT_MAX_CHUNK
    except ValueError:
        raise ValueError(f"BATCHROUTE_CHUNK_SIZE={value!r}: expected a whole number of jobs "
                         "per message (1 turns chunking off)") from None


class CeleryDispatcher:
    """Publishes ids only: Flower shows task arguments, so bodies and secrets never go there.

    A large publish (a batch's first attempts, a resume) puts several jobs in a message
    (`process_jobs`); a single job (a retry, an escalation) gets its own (`process_job`)."""

    def __init__(self, app: object | None = None, max_chunk_size: int | None = None) -> None:
        from celery import Celery

        self.app: Celery = app if isinstance(app, Celery) else make_celery("batchroute-client")
        self._bulk: RedisBulkPublisher | None = None
        self.max_chunk = max_chunk_size if max_chunk_size is not None else max_chunk()

    def enqueue(self, job_id: str, attempt_no: int, queue: str, delay_s: float = 0.0) -> None:
        self.app.send_task(TASK_NAME, args=[job_id, attempt_no], queue=queue,
                           countdown=bounded_delay(delay_s) or None)

    def enqueue_many(self, items: Sequence[tuple[str, int, str]]) -> None:
        # On Redis: a chunk of ready-made protocol-2 messages in one pipeline (~70x faster
        # than send_task per message; see batchroute.publish).
        if self._bulk is None and str(self.app.conf.broker_url).startswith(REDIS_SCHEMES):
            self._bulk = RedisBulkPublisher(self.app)
        if self._bulk is not None:
            self._bulk.publish(items, self.max_chunk)
            return
        # One connection for the whole chunk instead of one per message.
        with self.app.producer_or_acquire() as producer:
            for queue, pairs in by_queue(items).items():
                for group in chunks(pairs, self.max_chunk):
                    if len(group) == 1:
                        self.app.send_task(TASK_NAME, args=list(group[0]), queue=queue,
                                           producer=producer)
                    else:
                        self.app.send_task(CHUNK_TASK, args=[[list(p) for p in group]],
                                           queue=queue, producer=producer)


class LocalDispatcher:
    """An in-process broker + worker: a thread pool that runs jobs as they are enqueued."""

    def __init__(self, handler: Callable[[str, int], object] | None = None,
                 concurrency: int = 16) -> None:
        self.handler = handler
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="br-worker")
        self._pending = 0
        self._cond = threading.Condition()
        self.errors: list[BaseException] = []
        # Delayed jobs (retry backoff, rate-limit deferrals) wait in a heap watched by one
        # timer thread, not in a pool thread: waiting must not hold one of the slots.
        self._delayed: list[tuple[float, int, str, int]] = []
        self._seq = 0
        self._timer: threading.Thread | None = None
        self._closed = False

    def _run(self, job_id: str, attempt_no: int, delay_s: float = 0.0) -> None:
        try:
            assert self.handler is not None, "LocalDispatcher.handler is not set"
            self.handler(job_id, attempt_no)
        except BaseException as e:  # a bug must not hang join(): record it and go on
            log.exception("job_crashed", job_id=job_id, attempt=attempt_no)
            self.errors.append(e)
        finally:
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()

    def enqueue(self, job_id: str, attempt_no: int, queue: str, delay_s: float = 0.0) -> None:
        delay_s = bounded_delay(delay_s)
        with self._cond:
            self._pending += 1
            if delay_s > 0:
                self._seq += 1
                heapq.heappush(self._delayed,
                               (time.monotonic() + delay_s, self._seq, job_id, attempt_no))
                if self._timer is None:
                    self._timer = threading.Thread(target=self._release_due, daemon=True,
                                                   name="br-delayed")
                    self._timer.start()
                self._cond.notify_all()
                return
        self._pool.submit(self._run, job_id, attempt_no)

    def _release_due(self) -> None:
        """Hand delayed jobs to the pool when they are due. Every wait is bounded (at most
        MAX_DELAY_S, never inf/nan), so no value can overflow it and end this thread."""
        while True:
            with self._cond:
                while not self._closed and (
                        not self._delayed or self._delayed[0][0] > time.monotonic()):
                    due = self._delayed[0][0] if self._delayed else None
                    wait = MAX_DELAY_S if due is None else due - time.monotonic()
                    self._cond.wait(min(MAX_DELAY_S, max(0.0, wait)))
                if self._closed:
                    return
                _, _, job_id, attempt_no = heapq.heappop(self._delayed)
            try:
                self._pool.submit(self._run, job_id, attempt_no)
            except RuntimeError:  # the pool was shut down meanwhile
                return

    def enqueue_many(self, items: Sequence[tuple[str, int, str]]) -> None:
        for job_id, attempt_no, queue in items:
            self.enqueue(job_id, attempt_no, queue)

    @property
    def pending(self) -> int:
        return self._pending

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no job is queued or running (escalations included)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)
