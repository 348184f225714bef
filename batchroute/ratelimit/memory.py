"""The pools of one process (``batchroute run``): the same algorithm as the Redis Lua."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from batchroute.ratelimit.pools import (
    Outcome,
    Request,
    Scope,
    limits_of,
    pace,
    span,
    usage_dict,
)
from batchroute.ratelimit.schedule import (
    DEFER,
    GRANTED,
    RETRY,
    TURN_KEPT_S,
    commit,
    earliest,
    in_flight_until,
    settle_lead,
    settled_at,
    window_start,
)


@dataclass
class _Log:
    """What a limit admitted within its window: [time, units, holder], sorted by time, the
    time being the latest the request may reach the provider (``schedule``)."""

    entries: deque[list[Any]] = field(default_factory=deque)
    total: float = 0.0
    by_holder: dict[str, list[Any]] = field(default_factory=dict)

    def prune(self, now: float, span_s: float) -> None:
        while self.entries and self.entries[0][0] <= now - span_s:
            entry = self.entries.popleft()
            self.total -= entry[1]
            if self.by_holder.get(entry[2]) is entry:
                del self.by_holder[entry[2]]

    def add(self, at: float, units: float, holder: str) -> None:
        self._insert([at, units, holder])
        self.total += units

    def _insert(self, entry: list[Any]) -> None:
        i = len(self.entries)
        while i > 0 and self.entries[i - 1][0] > entry[0]:
            i -= 1
        self.entries.insert(i, entry)
        self.by_holder[entry[2]] = entry

    def restamp(self, holder: str, now: float) -> None:
        """The call settled at ``now``: it reached the provider by then."""
        entry = self.by_holder.get(holder)
        if entry is None or settled_at(entry[0], now) == entry[0]:
            return
        self.entries.remove(entry)
        entry[0] = settled_at(entry[0], now)
        self._insert(entry)

    def adjust(self, holder: str, delta: float) -> bool:
        """Correct an admitted entry to what the provider really counted (at the time it
        counted it). False when the entry has already left the window."""
        entry = self.by_holder.get(holder)
        if entry is None:
            return False
        delta = max(delta, -entry[1])
        entry[1] += delta
        self.total += delta
        return True

    def start(self, t0: float, cost: float, limit: int, span_s: float,
              clamp: float = math.inf) -> float:
        return window_start(((e[0], e[1]) for e in self.entries), self.total, t0, cost,
                            limit, span_s, clamp)


@dataclass
class _ScopeState:
    logs: dict[str, _Log] = field(default_factory=dict)  # "r"/"t" -> admitted
    shadow: dict[str, float] = field(default_factory=dict)  # "r"/"t"/"c" -> shadow schedule
    block: float = 0.0
    hold: float | None = None  # EWMA of how long a concurrency slot is held
    holders: dict[str, float] = field(default_factory=dict)  # holder -> lease expiry
    usage: dict[int, list[int]] = field(default_factory=dict)  # second -> [r, t, d]

    def log(self, kind: str) -> _Log:
        return self.logs.setdefault(kind, _Log())

    def count(self, now: float, window_s: float, r: int = 0, t: int = 0, d: int = 0) -> None:
        sec = math.floor(now)
        row = self.usage.setdefault(sec, [0, 0, 0])
        row[0] += r
        row[1] += t
        row[2] += d
        for old in [s for s in self.usage if s <= sec - window_s - 5]:
            del self.usage[old]

    def in_flight(self, now: float) -> int:
        for h in [h for h, exp in self.holders.items() if exp <= now]:
            del self.holders[h]
        return len(self.holders)


class MemoryBackend:
    """The same algorithm as the Lua, for one process (``batchroute run``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, _ScopeState] = {}
        self._turned: dict[str, float] = {}  # job key -> when its shadow turn lapses

    def _state(self, scope: Scope) -> _ScopeState:
        return self._states.setdefault(scope.key, _ScopeState())

    def acquire(self, scopes: Sequence[Scope], req: Request) -> Outcome:
        with self._lock:
            now = self.clock()
            states = [self._state(s) for s in scopes]
            t0, reason = now, ""
            for st in states:
                if st.block > t0:
                    t0, reason = st.block, "blocked"
            # start: safe to sleep until; soon: the earliest it could become safe, if the
            # calls in flight settled now (what a job is put back for).
            start = soon = t0
            for s, st in zip(scopes, states, strict=True):
                for kind, rate, cost in limits_of(s, req.cost):
                    log = st.log(kind)
                    log.prune(now, span(rate))
                    e = log.start(t0, cost, rate.limit, span(rate))
                    if e > start:
                        start, reason = e, ("rpm" if kind == "r" else "tpm")
                    soon = max(soon, log.start(t0, cost, rate.limit, span(rate), now))
            if not req.defer_only and start - now <= req.horizon_s:
                svc = 0.0
                for s, st in zip(scopes, states, strict=True):
                    if s.max_concurrency and st.in_flight(now) >= s.max_concurrency:
                        svc = max(svc, (st.hold or 1.0) / s.max_concurrency)
                if svc:
                    return Outcome(RETRY, svc, "concurrency", now)
                for s, st in zip(scopes, states, strict=True):
                    logged = in_flight_until(start, s.arrival_cap_s, req.in_flight_s)
                    for kind, _rate, cost in limits_of(s, req.cost):
                        st.log(kind).add(logged, cost, req.holder)
                    if s.max_concurrency:
                        st.holders[req.holder] = start + req.lease_s
                    st.count(now, s.window_s, r=1, t=req.cost)
                return Outcome(GRANTED, start - now, reason, now)
            if not req.defer_only and soon - now <= req.horizon_s:
                return Outcome(RETRY, soon - now, reason, now)  # a call about to settle
            return self._defer(scopes, states, req, now, soon, reason)

    def _defer(self, scopes: Sequence[Scope], states: list[_ScopeState], req: Request,
               now: float, start: float, reason: str) -> Outcome:
        for k in [k for k, until in self._turned.items() if until <= now]:
            del self._turned[k]
        if req.job_key and req.job_key in self._turned:  # came back early: rejoin
            for s, st in zip(scopes, states, strict=True):
                st.count(now, s.window_s, d=1)
            return Outcome(DEFER, start - now, reason or "concurrency", now,
                           start - now > req.max_defer_s)
        vstart = start
        for s, st in zip(scopes, states, strict=True):
            for kind, rate, cost in limits_of(s, req.cost):
                vstart = max(vstart, earliest(st.shadow.get(kind, 0.0), start, cost, pace(rate)))
            if s.max_concurrency:
                vstart = max(vstart, st.shadow.get("c", 0.0))
        capped = vstart - now > req.max_defer_s
        for s, st in zip(scopes, states, strict=True):
            if not capped:
                for kind, rate, cost in limits_of(s, req.cost):
                    st.shadow[kind] = commit(st.shadow.get(kind, 0.0), vstart, cost, pace(rate))
                if s.max_concurrency:
                    st.shadow["c"] = (max(st.shadow.get("c", 0.0), vstart)
                                      + (st.hold or 1.0) / s.max_concurrency)
            st.count(now, s.window_s, d=1)
        if req.job_key and not capped:
            self._turned[req.job_key] = vstart + TURN_KEPT_S
        return Outcome(DEFER, vstart - now, reason or "concurrency", now, capped)

    def settle(self, scopes: Sequence[Scope], holder: str, delta: int, started_at: float,
               block: Sequence[bool], block_s: float, lead_s: float = 0.0) -> None:
        with self._lock:
            now = self.clock()
            counted = now - settle_lead(lead_s, now, started_at)
            for s, blk in zip(scopes, block, strict=True):
                st = self._state(s)
                for kind, _rate, _cost in limits_of(s, 0):
                    st.log(kind).restamp(holder, counted)
                if s.tpm and delta and st.log("t").adjust(holder, delta):
                    st.count(now, s.window_s, t=delta)
                if s.max_concurrency and st.holders.pop(holder, None) is not None \
                        and started_at > 0:
                    held = max(0.0, now - started_at)
                    st.hold = held if st.hold is None else 0.8 * st.hold + 0.2 * held
                if blk and block_s > 0:
                    st.block = max(st.block, now + block_s)

    def usage(self, scope: Scope) -> dict[str, Any]:
        with self._lock:
            now = self.clock()
            st = self._state(scope)
            first = math.floor(now) - math.ceil(scope.window_s) + 1
            rows = [v for sec, v in st.usage.items() if sec >= first]
            return usage_dict(scope, sum(r[0] for r in rows), sum(r[1] for r in rows),
                              sum(r[2] for r in rows), st.in_flight(now),
                              max(0.0, st.block - now))
