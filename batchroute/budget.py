"""Budgets in USD, per batch and per project, that concurrent workers cannot overshoot.

Before a call, a worker *reserves* the most the call can cost (prompt estimate +
max_tokens at the model's price); after it, the reservation is *settled* with
the cost the provider's usage gives. A reservation that would take spent +
reserved past the limit is refused, so N workers together overshoot by at most
the error of one call's estimate. Near the limit, jobs stop escalating to
dearer tiers; at the limit, jobs end `budget_exhausted` and can be resumed once
the budget is raised.

The reservation arithmetic is pure (`fits`, `near_limit`); the backends keep the
counters: in memory for `batchroute run`, in Redis (one Lua call, atomic) for
Celery workers on many hosts. Counters start from the SQL ledger (the truth), so
a Redis restart does not forget what was spent.

A hold is a lease: it lasts the call's deadline (a parked job's: the batch's deadline)
plus `hold_grace_s`, and a hold not settled by then is given back, so a worker killed
mid-call does not keep its amount reserved for good. A late settle still adds what the
call cost to `spent`; it never gives the amount back a second time.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

KEY_PREFIX = "batchroute:budget:"
PROJECT = "project"
# How long a worker trusts a batch budget it read from the store (only to accept calls).
LIMIT_CACHE_S = 5.0


@dataclass(frozen=True)
class BudgetConfig:
    project_usd: float | None = None  # across every batch in the store
    batch_usd: float | None = None  # default for batches submitted without --budget-usd
    near_limit: float = 0.9  # share of a budget after which escalation stops
    hold_grace_s: float = 120.0  # a hold lasts its call's deadline + this (see Hold)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BudgetConfig:
        def num(key: str) -> float | None:
            return float(d[key]) if d.get(key) is not None else None

        return cls(project_usd=num("project_usd"), batch_usd=num("batch_usd"),
                   near_limit=float(d.get("near_limit", 0.9)),
                   hold_grace_s=float(d.get("hold_grace_s", 120.0)))


def fits(spent: float, reserved: float, amount: float, limit: float) -> bool:
    return spent + reserved + amount <= limit + 1e-12


def near_limit(spent: float, reserved: float, amount: float, limit: float,
               share: float) -> bool:
    return spent + reserved + amount > share * limit


# A hold is a lease (BudgetConfig.hold_grace_s past its call's deadline): a worker
# SIGKILLed mid-call, or a parked job whose provider batch is never collected, never
# settles it; without an end, its amount stayed "reserved" on the batch's and the
# project's counters for good, and a project budget shrank with every crash until jobs
# ended `budget_exhausted` with money left.
FOREVER_S = 10 * 365 * 86400.0  # a hold id without a time-to-live


class BudgetBackend(Protocol):
    """Counters per budget key: spent, and reserved as the sum of open holds (leases)."""

    def reserve(self, key: str, amount: float, limit: float, initial: Callable[[], float],
                hold_id: str = "", ttl_s: float | None = None) -> bool: ...

    def settle(self, key: str, reserved: float, actual: float,
               initial: Callable[[], float], hold_id: str = "") -> None: ...

    def usage(self, key: str, initial: Callable[[], float]) -> tuple[float, float]: ...


class MemoryBudgets:
    """In-process counters (`batchroute run`); holds expire as in RedisBudgets."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._state: dict[str, list[float]] = {}  # key -> [spent, reserved]
        self._holds: dict[str, dict[str, float]] = {}  # key -> open hold id -> amount
        self._ends: dict[str, list[tuple[float, str]]] = {}  # key -> heap of (end, hold id)
        self._clock = clock
        self._lock = threading.Lock()

    def _get(self, key: str, initial: Callable[[], float]) -> list[float]:
        if key not in self._state:
            self._state[key] = [initial(), 0.0]
        s = self._state[key]
        ends = self._ends.get(key)
        if ends:
            now, holds = self._clock(), self._holds[key]
            while ends and ends[0][0] <= now:
                amount = holds.pop(heapq.heappop(ends)[1], None)
                if amount is not None:  # not settled in time: given back
                    s[1] = max(0.0, s[1] - amount)
        return s

    def reserve(self, key: str, amount: float, limit: float, initial: Callable[[], float],
                hold_id: str = "", ttl_s: float | None = None) -> bool:
        with self._lock:
            s = self._get(key, initial)
            if not fits(s[0], s[1], amount, limit):
                return False
            s[1] += amount
            if hold_id:
                self._holds.setdefault(key, {})[hold_id] = amount
                heapq.heappush(self._ends.setdefault(key, []),
                               (self._clock() + (FOREVER_S if ttl_s is None else ttl_s), hold_id))
            return True

    def settle(self, key: str, reserved: float, actual: float,
               initial: Callable[[], float], hold_id: str = "") -> None:
        with self._lock:
            s = self._get(key, initial)
            s[0] += actual
            if hold_id and self._holds.get(key, {}).pop(hold_id, None) is None:
                return  # expired, and given back already
            s[1] = max(0.0, s[1] - reserved)

    def usage(self, key: str, initial: Callable[[], float]) -> tuple[float, float]:
        with self._lock:
            s = self._get(key, initial)
            return s[0], s[1]


# KEYS[1] budget hash (spent, reserved, and "h:<id>" -> amount of each open hold),
# KEYS[2] the holds' ends (sorted set, Redis TIME seconds).
# ARGV: op, amount/reserved, limit/actual, initial spent, hold id, ttl seconds.
# Expired holds are given back first, a bounded number per call, on the server's clock.
_LUA = """
local key, ends, op = KEYS[1], KEYS[2], ARGV[1]
redis.call('HSETNX', key, 'spent', ARGV[4])
redis.call('HSETNX', key, 'reserved', '0')
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local reserved = tonumber(redis.call('HGET', key, 'reserved'))
local gone = redis.call('ZRANGEBYSCORE', ends, '-inf', now, 'LIMIT', 0, 256)
for _, hid in ipairs(gone) do
  local amt = tonumber(redis.call('HGET', key, 'h:' .. hid) or '0')
  reserved = math.max(0, reserved - amt)
  redis.call('HDEL', key, 'h:' .. hid)
  redis.call('ZREM', ends, hid)
end
if #gone > 0 then redis.call('HSET', key, 'reserved', tostring(reserved)) end
local spent = tonumber(redis.call('HGET', key, 'spent'))
local hid = ARGV[5]
if op == 'reserve' then
  local amount, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
  if spent + reserved + amount > limit + 1e-12 then
    return {0, tostring(spent), tostring(reserved)}
  end
  reserved = reserved + amount
  redis.call('HSET', key, 'reserved', tostring(reserved))
  if hid ~= '' then
    redis.call('HSET', key, 'h:' .. hid, ARGV[2])
    redis.call('ZADD', ends, now + tonumber(ARGV[6]), hid)
  end
  return {1, tostring(spent), tostring(reserved)}
elseif op == 'settle' then
  local held, actual = tonumber(ARGV[2]), tonumber(ARGV[3])
  spent = tonumber(redis.call('HINCRBYFLOAT', key, 'spent', actual))
  local open = true
  if hid ~= '' then
    open = redis.call('ZREM', ends, hid) == 1
    redis.call('HDEL', key, 'h:' .. hid)
  end
  if open then
    reserved = math.max(0, reserved - held)
    redis.call('HSET', key, 'reserved', tostring(reserved))
  end
  return {1, tostring(spent), tostring(reserved)}
end
return {1, tostring(spent), tostring(reserved)}
"""


class RedisBudgets:
    """Budget counters in Redis, shared by every worker process and host."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._script = redis.register_script(_LUA)

    @staticmethod
    def _hash(key: str) -> str:
        # Braces: the counters and the holds' ends share a Redis Cluster hash slot.
        return f"{KEY_PREFIX}{{{key}}}"

    def _run(self, key: str, op: str, a: float = 0.0, b: float = 0.0,
             initial: float = 0.0, hold_id: str = "", ttl_s: float = 0.0,
             ) -> tuple[bool, float, float]:
        ok, spent, reserved = self._script(
            keys=[self._hash(key), self._hash(key) + ":ends"],
            args=[op, repr(a), repr(b), repr(initial), hold_id, repr(ttl_s)])
        return int(ok) == 1, float(spent), float(reserved)

    def _start(self, key: str, initial: Callable[[], float]) -> float:
        # A key lost with a Redis restart starts again from the SQL ledger.
        return initial() if not self.redis.exists(self._hash(key)) else 0.0

    def reserve(self, key: str, amount: float, limit: float, initial: Callable[[], float],
                hold_id: str = "", ttl_s: float | None = None) -> bool:
        return self._run(key, "reserve", amount, limit, self._start(key, initial),
                         hold_id, FOREVER_S if ttl_s is None else ttl_s)[0]

    def settle(self, key: str, reserved: float, actual: float,
               initial: Callable[[], float], hold_id: str = "") -> None:
        self._run(key, "settle", reserved, actual, self._start(key, initial), hold_id)

    def usage(self, key: str, initial: Callable[[], float]) -> tuple[float, float]:
        _, spent, reserved = self._run(key, "peek", initial=self._start(key, initial))
        return spent, reserved


@dataclass(frozen=True)
class Hold:
    """Reservations made for one call: (budget key, limit, amount) each, under one lease
    id (empty: a hold from before leases, settled by amount alone)."""

    parts: tuple[tuple[str, float, float], ...] = ()
    id: str = ""


class BudgetRefused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BudgetGuard:
    """Reserve before a call, settle after it, against every budget that applies to a job."""

    def __init__(self, config: BudgetConfig, backend: BudgetBackend,
                 batch_limit: Callable[[str], float | None],
                 spent_in_store: Callable[[str | None], float]) -> None:
        self.config = config
        self.backend = backend
        self._batch_limit = batch_limit
        self._spent = spent_in_store
        # batch id -> (read at, budget): one SQL read per batch per few seconds instead of one
        # per attempt. A stale value is only ever trusted to *accept*: a refusal re-reads it
        # (see hold), so a budget raised for `resume` is honoured at once.
        self._cache: dict[str, tuple[float, float | None]] = {}
        self._cache_lock = threading.Lock()

    def _batch_budget(self, batch_id: str, fresh: bool) -> float | None:
        now = time.monotonic()
        with self._cache_lock:
            hit = self._cache.get(batch_id)
        if hit is not None and not fresh and now - hit[0] < LIMIT_CACHE_S:
            return hit[1]
        value = self._batch_limit(batch_id)
        with self._cache_lock:
            if len(self._cache) > 1024:  # many finished batches: forget them all
                self._cache.clear()
            self._cache[batch_id] = (now, value)
        return value

    def limits(self, batch_id: str, fresh: bool = True) -> list[tuple[str, str, float]]:
        """(backend key, label, limit) of each budget over this batch; ``fresh=False``
        accepts a batch budget read up to LIMIT_CACHE_S ago."""
        out = []
        batch = self._batch_budget(batch_id, fresh)
        if batch is None:
            batch = self.config.batch_usd
        if batch is not None:
            out.append((f"batch:{batch_id}", f"batch {batch_id}", batch))
        if self.config.project_usd is not None:
            out.append((PROJECT, "project", self.config.project_usd))
        return out

    def _initial(self, key: str) -> Callable[[], float]:
        scope = key.removeprefix("batch:") if key.startswith("batch:") else None
        return lambda: self._spent(scope)

    def hold(self, batch_id: str, max_cost: float, escalating: bool, ttl_s: float) -> Hold:
        """Reserve `max_cost` under every budget for at most ``ttl_s`` (+ hold_grace_s),
        or raise BudgetRefused saying which. A hold not settled by then is given back:
        its holder died, and the ledger has whatever it was billed."""
        try:
            return self._hold(self.limits(batch_id, fresh=False), max_cost, escalating, ttl_s)
        except BudgetRefused:
            # Refused on a budget read a moment ago: it may have been raised since.
            return self._hold(self.limits(batch_id), max_cost, escalating, ttl_s)

    def _hold(self, limits: list[tuple[str, str, float]], max_cost: float,
              escalating: bool, ttl_s: float) -> Hold:
        hold_id = uuid.uuid4().hex
        # Bounded whatever the config says (a timeout of 1e308 s, a NaN grace): a float
        # Redis can read, at most FOREVER_S.
        lease = min(FOREVER_S, max(0.0, ttl_s) + max(0.0, self.config.hold_grace_s))
        lease = lease if math.isfinite(lease) else FOREVER_S
        parts: list[tuple[str, float, float]] = []
        try:
            for key, label, limit in limits:
                if escalating:
                    spent, reserved = self.backend.usage(key, self._initial(key))
                    if near_limit(spent, reserved, max_cost, limit, self.config.near_limit):
                        raise BudgetRefused(
                            f"{label} budget ${limit:.4f} is {100 * (spent + reserved) / limit:.0f}"
                            f"% used: escalation to a dearer tier stopped "
                            f"(near_limit {self.config.near_limit:.0%})")
                if not self.backend.reserve(key, max_cost, limit, self._initial(key),
                                            hold_id, lease):
                    raise BudgetRefused(f"{label} budget ${limit:.4f} spent (this call could "
                                        f"cost up to ${max_cost:.6f}); raise it and resume")
                parts.append((key, limit, max_cost))
        except BudgetRefused:
            for key, _limit, amount in parts:
                self.backend.settle(key, amount, 0.0, self._initial(key), hold_id)
            raise
        return Hold(tuple(parts), hold_id)

    def settle(self, hold: Hold, actual: float) -> None:
        # A cost is never negative (batchroute.billing clamps it); a negative one here would
        # give back budget never spent and let the batch overspend, so it settles as 0.
        actual = actual if actual > 0 else 0.0  # also nan
        for key, _limit, amount in hold.parts:
            self.backend.settle(key, amount, actual, self._initial(key), hold.id)

    def status(self, batch_id: str) -> list[dict[str, Any]]:
        rows = []
        for key, label, limit in self.limits(batch_id):
            spent, reserved = self.backend.usage(key, self._initial(key))
            rows.append({"budget": label, "limit_usd": limit, "spent_usd": round(spent, 8),
                         "reserved_usd": round(reserved, 8)})
        return rows
