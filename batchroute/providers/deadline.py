"""A total deadline per provider call, on top of httpx's per-read timeout.

Why: httpx's `timeout` bounds each read, so a server that trickles its body one byte
every two seconds keeps a call (and a worker slot, and a claim's lease) forever. One
watchdog thread per process keeps a heap of armed deadlines; when one passes, it shuts
down the call's socket, which wakes the blocked read at once (a plain close() does not
wake a read blocked in another thread on Linux), and the caller sees `fired` and
reports `deadline_exceeded`. One thread for every call, not a Timer per call: arming
costs a heap push, not a thread start, on the hot path.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from typing import Any

import structlog

log = structlog.get_logger("batchroute.providers.deadline")


class Guard:
    """One armed deadline: the sockets of the call it watches, and whether it fired."""

    __slots__ = ("at", "fired", "done", "_sockets", "_lock")

    def __init__(self, at: float) -> None:
        self.at = at
        self.fired = False
        self.done = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def watch(self, network_stream: Any) -> None:
        """Remember the call's socket (from httpx's ``network_stream`` extension or a
        trace event); if the deadline already passed, cut it now."""
        sock = _socket_of(network_stream)
        if sock is None:
            return
        with self._lock:
            self._sockets.append(sock)
            fired = self.fired
        if fired:
            _shutdown(sock)

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpx ``trace`` extension hook: a fresh connection's stream, before any header
        arrives, so a trickled *header* is cut too."""
        if event.endswith("connect_tcp.complete") or event.endswith("start_tls.complete"):
            self.watch(info.get("return_value"))

    def fire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.fired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def disarm(self) -> None:
        with self._lock:
            self.done = True
            self._sockets.clear()

    def left(self) -> float:
        return self.at - time.monotonic()


def _socket_of(stream: Any) -> socket.socket | None:
    if stream is None:
        return None
    try:
        sock = stream.get_extra_info("socket")
    except Exception:  # an unknown transport: nothing to cut, httpx's timeout still applies
        return None
    return sock if isinstance(sock, socket.socket) else None


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed: nothing is blocked on it
        sock.shutdown(socket.SHUT_RDWR)


class Watchdog:
    """The process's deadline thread: fires guards whose time has come."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Guard]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._compact_at = 256

    def arm(self, seconds: float) -> Guard:
        guard = Guard(time.monotonic() + max(0.0, seconds))
        with self._cond:
            if len(self._heap) >= self._compact_at:
                # Finished calls leave their entries behind (disarming is a flag, not a
                # heap removal): drop them now and then, so the heap holds about the calls
                # in flight instead of every call of the last deadline_s seconds.
                live = [e for e in self._heap if not e[2].done]
                heapq.heapify(live)
                self._heap = live
                self._compact_at = max(256, 2 * len(live))  # amortised O(1) per call
            heapq.heappush(self._heap, (guard.at, next(self._seq), guard))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="br-deadline")
                self._thread.start()
            elif self._heap[0][2] is guard:
                self._cond.notify()
        return guard

    def _loop(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    _, _, guard = heapq.heappop(self._heap)
                    if not guard.done:
                        due = guard
                        break
                else:
                    # Sleep until the next deadline, at most 60 s (a bounded wait: never
                    # an overflow, whatever is armed).
                    wait = min(60.0, self._heap[0][0] - now) if self._heap else 60.0
                    self._cond.wait(max(0.001, wait))
                    continue
            try:
                due.fire()
            except Exception:  # the thread must outlive any one call
                log.warning("deadline_fire_failed", exc_info=True)


    def _after_fork(self) -> None:
        """A forked child (Celery prefork) has no watchdog thread and maybe a lock held by
        a parent thread: start afresh; the next call starts the child's own thread."""
        self._heap = []
        self._cond = threading.Condition()
        self._thread = None
        self._compact_at = 256


WATCHDOG = Watchdog()
os.register_at_fork(after_in_child=WATCHDOG._after_fork)
