"""Circuit breakers shared by every worker: stop sending jobs to a model that keeps failing.

After `failures` provider errors within `window_s`, a model is *open* (cooled
down) for `cooldown_s` for all workers, and its jobs go to the equivalent models
of the same tier. When the cooldown ends one caller gets the *probe*: its
success closes the breaker, its failure opens it again. The state machine is
pure (`BreakerState`, `decide`); the backends only store it: in memory for the
embedded run, in Redis for the distributed one (like dramatiq's rate-limit
backends), so every worker on every host sees the same state.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

KEY_PREFIX = "batchroute:breaker:"
# How long a worker trusts a "closed" answer from Redis before asking again (see allow).
CLOSED_TTL_S = 0.5


@dataclass(frozen=True)
class BreakerConfig:
    failures: int = 5
    window_s: float = 30.0
    cooldown_s: float = 30.0
    probe_timeout_s: float = 60.0  # a probe that never reports frees its slot after this

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BreakerConfig:
        return cls(**{k: type(getattr(cls, k))(v) for k, v in d.items()
                      if k in cls.__dataclass_fields__})


@dataclass
class BreakerState:
    """What is known about one model; `failures` are timestamps within the window."""

    failures: list[float] = field(default_factory=list)
    open_until: float = 0.0
    probe_until: float = 0.0  # a probe is in flight until then
    opened: int = 0  # times this breaker opened (for reports)


def allow(state: BreakerState, now: float, cfg: BreakerConfig) -> tuple[bool, bool]:
    """(may call, is the probe). Mutates `state` to claim the probe slot."""
    if state.open_until == 0.0:
        return True, False
    if now < state.open_until or now < state.probe_until:
        return False, False
    state.probe_until = now + cfg.probe_timeout_s
    return True, True


def record(state: BreakerState, ok: bool, now: float, cfg: BreakerConfig) -> bool:
    """Record an outcome; returns True when this outcome opened the breaker."""
    if ok:
        # Only a success after the cooldown (the probe) closes the breaker: calls that
        # were already in flight when it opened prove nothing, and while closed a
        # success does not wipe the window: a model failing one call in three is unhealthy.
        if state.open_until != 0.0 and now >= state.open_until:
            state.failures.clear()
            state.open_until = state.probe_until = 0.0
        return False
    half_open = state.open_until != 0.0 and now >= state.open_until
    state.failures = [t for t in state.failures if t > now - cfg.window_s] + [now]
    if half_open or len(state.failures) >= cfg.failures:
        state.open_until = now + cfg.cooldown_s
        state.probe_until = 0.0
        state.failures.clear()
        state.opened += 1
        return True
    return False


class Breakers(Protocol):
    config: BreakerConfig

    def allow(self, key: str) -> bool: ...

    def record(self, key: str, ok: bool) -> bool: ...

    def snapshot(self) -> dict[str, dict[str, Any]]: ...


class MemoryBreakers:
    """In-process breakers for `batchroute run`."""

    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.config = config or BreakerConfig()
        self._states: dict[str, BreakerState] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        with self._lock:
            return allow(self._states.setdefault(key, BreakerState()), time.time(),
                         self.config)[0]

    def record(self, key: str, ok: bool) -> bool:
        with self._lock:
            return record(self._states.setdefault(key, BreakerState()), ok, time.time(),
                          self.config)

    def remaining(self, key: str) -> float:
        with self._lock:
            s = self._states.get(key)
            return max(0.0, s.open_until - time.time()) if s else 0.0

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        with self._lock:
            return {k: _describe(s, now) for k, s in self._states.items()}


def _describe(s: BreakerState, now: float) -> dict[str, Any]:
    state = "closed" if s.open_until == 0.0 else ("open" if now < s.open_until else "half_open")
    return {"state": state, "opened": s.opened, "recent_failures": len(s.failures),
            "reopens_in_s": round(max(0.0, s.open_until - now), 1)}


# The Redis backend runs the same state machine inside one Lua script per call, on the
# server's clock, so concurrent workers on different hosts cannot race or disagree on time.
_LUA = """
local key, op, ok = KEYS[1], ARGV[1], ARGV[2]
local failures, window, cooldown, probe_timeout = tonumber(ARGV[3]), tonumber(ARGV[4]),
    tonumber(ARGV[5]), tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local open_until = tonumber(redis.call('HGET', key, 'open_until') or '0')
local probe_until = tonumber(redis.call('HGET', key, 'probe_until') or '0')
local fkey = key .. ':failures'
if op == 'allow' then
  if open_until == 0 then return 2 end  -- closed: the caller may remember that briefly
  if now < open_until or now < probe_until then return 0 end
  redis.call('HSET', key, 'probe_until', now + probe_timeout)
  return 1
end
if ok == '1' then
  if open_until ~= 0 and now >= open_until then
    redis.call('HSET', key, 'open_until', 0, 'probe_until', 0)
    redis.call('DEL', fkey)
  end
  return 0
end
local half_open = open_until ~= 0 and now >= open_until
redis.call('ZREMRANGEBYSCORE', fkey, '-inf', now - window)
redis.call('ZADD', fkey, now, tostring(now) .. ':' .. tostring(math.random()))
redis.call('EXPIRE', fkey, math.ceil(window) + 1)
if half_open or redis.call('ZCARD', fkey) >= failures then
  redis.call('HSET', key, 'open_until', now + cooldown, 'probe_until', 0)
  redis.call('HINCRBY', key, 'opened', 1)
  redis.call('DEL', fkey)
  return 1
end
return 0
"""


class RedisBreakers:
    """Breakers whose state lives in Redis, shared by every worker process and host."""

    def __init__(self, redis: Any, config: BreakerConfig | None = None,
                 closed_ttl_s: float | None = None) -> None:
        self.config = config or BreakerConfig()
        self.redis = redis
        self._script = redis.register_script(_LUA)
        # key -> monotonic time until which this process trusts "closed" without asking
        # Redis. Shorter than the cooldown, so a success skipped while trusted is one the
        # state machine ignores anyway (a closed breaker's success changes nothing).
        self.closed_ttl_s = (min(CLOSED_TTL_S, self.config.cooldown_s / 2)
                             if closed_ttl_s is None else closed_ttl_s)
        self._closed_until: dict[str, float] = {}

    def _run(self, key: str, op: str, ok: bool = False) -> int:
        c = self.config
        return int(self._script(keys=[KEY_PREFIX + key],
                                args=[op, "1" if ok else "0", c.failures, c.window_s,
                                      c.cooldown_s, c.probe_timeout_s]))

    def _trusted_closed(self, key: str) -> bool:
        return time.monotonic() < self._closed_until.get(key, 0.0)

    def allow(self, key: str) -> bool:
        """Two Redis calls per attempt (allow, record) were ~10% of a busy worker's CPU; a
        healthy model's breaker stays closed, so its answer is reused for ``closed_ttl_s``.
        The price: another worker's opening reaches this process that much later."""
        if self._trusted_closed(key):
            return True
        state = self._run(key, "allow")
        if state == 2:
            self._closed_until[key] = time.monotonic() + self.closed_ttl_s
        return state >= 1

    def record(self, key: str, ok: bool) -> bool:
        if ok and self._trusted_closed(key):
            return False  # a success while closed is a no-op in the state machine
        opened = self._run(key, "record", ok) == 1
        if opened or not ok:
            self._closed_until.pop(key, None)  # failing: ask Redis again from now on
        return opened

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        out: dict[str, dict[str, Any]] = {}
        for raw in self.redis.scan_iter(match=KEY_PREFIX + "*"):
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            if name.endswith(":failures"):
                continue
            h = {(k.decode() if isinstance(k, bytes) else k): float(v)
                 for k, v in self.redis.hgetall(name).items()}
            fails = self.redis.zcard(name + ":failures")
            state = BreakerState(failures=[0.0] * int(fails), open_until=h.get("open_until", 0.0),
                                 opened=int(h.get("opened", 0)))
            out[name.removeprefix(KEY_PREFIX)] = _describe(state, now)
        return out
