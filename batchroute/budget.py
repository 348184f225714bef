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
"""

from __future__ import annotations

import threading
import time
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BudgetConfig:
        def num(key: str) -> float | None:
            return float(d[key]) if d.get(key) is not None else None

        return cls(project_usd=num("project_usd"), batch_usd=num("batch_usd"),
                   near_limit=float(d.get("near_limit", 0.9)))


def fits(spent: float, reserved: float, amount: float, limit: float) -> bool:
    return spent + reserved + amount <= limit + 1e-12


def near_limit(spent: float, reserved: float, amount: float, limit: float,
               share: float) -> bool:
    return spent + reserved + amount > share * limit


class BudgetBackend(Protocol):
    def reserve(self, key: str, amount: float, limit: float,
                initial: Callable[[], float]) -> bool: ...

    def settle(self, key: str, reserved: float, actual: float,
               initial: Callable[[], float]) -> None: ...

    def usage(self, key: str, initial: Callable[[], float]) -> tuple[float, float]: ...


class MemoryBudgets:
    def __init__(self) -> None:
        self._state: dict[str, list[float]] = {}  # key -> [spent, reserved]
        self._lock = threading.Lock()

    def _get(self, key: str, initial: Callable[[], float]) -> list[float]:
        if key not in self._state:
            self._state[key] = [initial(), 0.0]
        return self._state[key]

    def reserve(self, key: str, amount: float, limit: float,
                initial: Callable[[], float]) -> bool:
        with self._lock:
            s = self._get(key, initial)
            if not fits(s[0], s[1], amount, limit):
                return False
            s[1] += amount
            return True

    def settle(self, key: str, reserved: float, actual: float,
               initial: Callable[[], float]) -> None:
        with self._lock:
            s = self._get(key, initial)
            s[0] += actual
            s[1] = max(0.0, s[1] - reserved)

    def usage(self, key: str, initial: Callable[[], float]) -> tuple[float, float]:
        with self._lock:
            s = self._get(key, initial)
            return s[0], s[1]


# KEYS[1] budget hash; ARGV: op, amount/reserved, limit/actual, initial spent.
_LUA = """
local key, op = KEYS[1], ARGV[1]
redis.call('HSETNX', key, 'spent', ARGV[4])
redis.call('HSETNX', key, 'reserved', '0')
local spent = tonumber(redis.call('HGET', key, 'spent'))
local reserved = tonumber(redis.call('HGET', key, 'reserved'))
if op == 'reserve' then
  local amount, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
  if spent + reserved + amount > limit + 1e-12 then return 0 end
  redis.call('HINCRBYFLOAT', key, 'reserved', amount)
  return 1
elseif op == 'settle' then
  local held, actual = tonumber(ARGV[2]), tonumber(ARGV[3])
  redis.call('HINCRBYFLOAT', key, 'spent', actual)
  redis.call('HSET', key, 'reserved', tostring(math.max(0, reserved - held)))
  return 1
end
return 1
"""


class RedisBudgets:
    """Budget counters in Redis, shared by every worker process and host."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._script = redis.register_script(_LUA)

    def _run(self, key: str, op: str, a: float = 0.0, b: float = 0.0,
             initial: float = 0.0) -> int:
        return int(self._script(keys=[KEY_PREFIX + key], args=[op, repr(a), repr(b),
                                                                repr(initial)]))

    def reserve(self, key: str, amount: float, limit: float,
                initial: Callable[[], float]) -> bool:
        if not self.redis.exists(KEY_PREFIX + key):
            return self._run(key, "reserve", amount, limit, initial()) == 1
        return self._run(key, "reserve", amount, limit) == 1

    def settle(self, key: str, reserved: float, actual: float,
               initial: Callable[[], float]) -> None:
        # A key lost with a Redis restart starts again from the SQL ledger.
        start = initial() if not self.redis.exists(KEY_PREFIX + key) else 0.0
        self._run(key, "settle", reserved, actual, start)

    def usage(self, key: str, initial: Callable[[], float]) -> tuple[float, float]:
        if not self.redis.exists(KEY_PREFIX + key):
            self._run(key, "peek", 0.0, 0.0, initial())
        h = self.redis.hgetall(KEY_PREFIX + key)
        get = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in h.items()}
        return get.get("spent", 0.0), get.get("reserved", 0.0)


@dataclass(frozen=True)
class Hold:
    """Reservations made for one call: (budget key, limit, amount) each."""

    parts: tuple[tuple[str, float, float], ...] = ()


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

    def hold(self, batch_id: str, max_cost: float, escalating: bool) -> Hold:
        """Reserve `max_cost` under every budget, or raise BudgetRefused saying which."""
        try:
            return self._hold(self.limits(batch_id, fresh=False), max_cost, escalating)
        except BudgetRefused:
            # Refused on a budget read a moment ago: it may have been raised since.
            return self._hold(self.limits(batch_id), max_cost, escalating)

    def _hold(self, limits: list[tuple[str, str, float]], max_cost: float,
              escalating: bool) -> Hold:
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
                if not self.backend.reserve(key, max_cost, limit, self._initial(key)):
                    raise BudgetRefused(f"{label} budget ${limit:.4f} spent (this call could "
                                        f"cost up to ${max_cost:.6f}); raise it and resume")
                parts.append((key, limit, max_cost))
        except BudgetRefused:
            for key, _limit, amount in parts:
                self.backend.settle(key, amount, 0.0, self._initial(key))
            raise
        return Hold(tuple(parts))

    def settle(self, hold: Hold, actual: float) -> None:
        # A cost is never negative (batchroute.billing clamps it); a negative one here would
        # give back budget never spent and let the batch overspend, so it settles as 0.
        actual = actual if actual > 0 else 0.0  # also nan
        for key, _limit, amount in hold.parts:
            self.backend.settle(key, amount, actual, self._initial(key))

    def status(self, batch_id: str) -> list[dict[str, Any]]:
        rows = []
        for key, label, limit in self.limits(batch_id):
            spent, reserved = self.backend.usage(key, self._initial(key))
            rows.append({"budget": label, "limit_usd": limit, "spent_usd": round(spent, 8),
                         "reserved_usd": round(reserved, 8)})
        return rows
