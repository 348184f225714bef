"""Map a function over chunks of work in worker processes, in order, with bounded memory.

Why processes: parsing a batch line (JSON, checks, a tiktoken count, routing) is ~170 µs
of pure-Python CPU, and tiktoken does not let threads run it in parallel, so one process
tops out near 5,000 lines/s before it has stored or published anything. Forked workers
parse while the parent stores and publishes the chunks already parsed.

Why not `multiprocessing.Pool.imap`: its feeder thread reads the whole input ahead, which
for a 100k-line file means the whole file in memory. Here at most `ahead` chunks are in
flight, results come back in input order (so "first occurrence wins" rules still hold),
and with `workers=0` the same code runs in-process, which is what small inputs use.

Workers are forked (on platforms that have fork): they start in milliseconds with the
parent's modules and caches (the tokenizer takes ~1.5 s to load otherwise) and run only
pure functions, never the parent's database or broker connections (batchroute.forksafe
makes the inherited ones harmless: kombu's own after-fork close of a pool with a BRPOP in
flight used to block these children, and with them the whole ingest, forever).
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_state: Any = None  # what the initializer gave this worker process


def _init(state: Any) -> None:
    global _state
    _state = state


def _noop() -> None:
    return None


def _call(fn: Callable[[Any, Any], Any], item: Any) -> Any:
    return fn(_state, item)


def default_workers(limit: int = 4) -> int:
    """One worker per CPU the process may use, at most `limit` (the parent needs a share,
    and the database server is often on the same machine)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, limit))


class OrderedPool(Generic[T, R]):
    """`map(items)` yields `fn(state, item)` for each item, in order.

    `fn` must be a module-level function (it is sent to the workers by name); `state` is
    handed to each worker once, at start."""

    def __init__(self, fn: Callable[[Any, T], R], state: Any, workers: int,
                 ahead: int | None = None) -> None:
        self.fn, self.state, self.workers = fn, state, workers
        self.ahead = ahead or max(2, 2 * workers)
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> OrderedPool[T, R]:
        if self.workers > 0:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self._executor = ProcessPoolExecutor(self.workers, mp_context=ctx,
                                                 initializer=_init, initargs=(self.state,))
            with warnings.catch_warnings():
                # Python 3.12+ warns about fork in a threaded process; the children run
                # only `fn` on plain data, never locks or connections of other threads.
                warnings.filterwarnings("ignore", category=DeprecationWarning,
                                        message=".*fork.*")
                self._executor.submit(_noop).result()  # start the workers now
        return self

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def map(self, items: Iterable[T]) -> Iterator[R]:
        if self._executor is None:
            for item in items:
                yield self.fn(self.state, item)
            return
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(self._executor.submit(_call, self.fn, item))
            if len(pending) >= self.ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
