"""Circuit breakers shared by every worker: stop sending jobs to a model that is down.

For batch work a transient error is a reason to wait, not to fail, so the breaker only
protects against a model that is really *down*, the way resilience4j's count/time-based
breaker and Envoy's outlier detection (success-rate ejection) do:

* it opens on a failure **rate**, not a count: at least `min_calls` outcomes within the
  sliding `window_s` and a failure share of at least `failure_rate`. A model failing 10%
  or 30% of its calls keeps answering the other 90% or 70%, and stays in use;
* rate-limit signals (429, `remaining: 0`) are not health signals: the caller never
  records them here (the rate-limit pools slow down instead);
* when the cooldown ends it is *half-open*: `half_open_calls` trial calls go through (not
  one probe), and their failure share decides: below `failure_rate` closes it, otherwise
  it re-opens for a cooldown that doubles each time (Envoy's ejection time grows with the
  ejection count), up to `max_cooldown_s`.

The state machine is pure (`BreakerState`, `allow`, `record`); the backends only store
it: in memory for the embedded run, in Redis (one Lua script, the server's clock) for the
distributed one, so every worker on every host sees the same state.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

KEY_PREFIX = "batchroute:breaker:"
# How long a worker trusts a "closed" answer from Redis before asking again (see allow).
CLOSED_TTL_S = 0.5
# The sliding window is kept as this many buckets (counts, not one entry per call), so
# its cost does not grow with the call rate; the oldest bucket ages out whole.
BUCKETS = 10


@dataclass(frozen=True)
class BreakerConfig:
    min_calls: int = 20  # fewer outcomes than this in the window never open it
    failure_rate: float = 0.5  # share of failed calls (of those outcomes) that opens it
    window_s: float = 30.0
    cooldown_s: float = 10.0  # the first open period; doubles at each re-open ...
    max_cooldown_s: float = 300.0  # ... up to this
    half_open_calls: int = 10  # trial calls let through once the cooldown is over
    probe_timeout_s: float = 60.0  # trial slots that never report are freed after this

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BreakerConfig:
        """From the config's `[breaker]` table. `failures` (the old count threshold) is
        read as `min_calls`: with the default rate, that many all-failed calls open it."""
        d = dict(d)
        if "failures" in d and "min_calls" not in d:
            d["min_calls"] = d.pop("failures")
        return cls(**{k: type(getattr(cls, k))(v) for k, v in d.items()
                      if k in cls.__dataclass_fields__})

    def cooldown(self, streak: int) -> float:
        """The open period after `streak` consecutive openings (1 for the first)."""
        return min(self.max_cooldown_s, self.cooldown_s * 2 ** max(0, streak - 1))


@dataclass
class BreakerState:
    """What is known about one model. `buckets` maps a window bucket to [ok, failed]."""

    buckets: dict[int, list[int]] = field(default_factory=dict)
    open_until: float = 0.0  # 0: closed
    streak: int = 0  # consecutive openings without a close in between
    admitted: int = 0  # trial calls let through in this half-open period
    trial_ok: int = 0
    trial_failed: int = 0
    trials_until: float = 0.0  # past it, admitted trials that never reported are freed
    opened: int = 0  # times this breaker opened (for reports)


def _bucket(now: float, cfg: BreakerConfig) -> int:
    return int(now // (cfg.window_s / BUCKETS))


def window_counts(state: BreakerState, now: float, cfg: BreakerConfig) -> tuple[int, int]:
    """(ok, failed) within the window, dropping buckets that aged out."""
    first = _bucket(now, cfg) - BUCKETS + 1
    for b in [b for b in state.buckets if b < first]:
        del state.buckets[b]
    ok = sum(c[0] for c in state.buckets.values())
    return ok, sum(c[1] for c in state.buckets.values())


def should_open(ok: int, failed: int, cfg: BreakerConfig) -> bool:
    total = ok + failed
    return total >= cfg.min_calls and failed >= cfg.failure_rate * total


def trial_verdict(ok: int, failed: int, cfg: BreakerConfig) -> bool | None:
    """True: close, False: re-open, None: not decided yet. Decided as soon as the rest of
    the trials could not change the outcome."""
    n = max(1, cfg.half_open_calls)
    fail_limit = max(1, math.ceil(cfg.failure_rate * n))  # this many failures re-open it
    if failed >= fail_limit:
        return False
    if ok > n - fail_limit:
        return True
    return None


def _open(state: BreakerState, now: float, cfg: BreakerConfig) -> None:
    state.streak += 1
    state.opened += 1
    state.open_until = now + cfg.cooldown(state.streak)
    state.buckets.clear()
    state.admitted = state.trial_ok = state.trial_failed = 0
    state.trials_until = 0.0


def allow(state: BreakerState, now: float, cfg: BreakerConfig) -> tuple[bool, bool]:
    """(may call, is a trial call). Mutates `state` to claim a trial slot."""
    if state.open_until == 0.0:
        return True, False
    if now < state.open_until:
        return False, False
    if state.trials_until and now >= state.trials_until:  # lost trials free their slots
        state.admitted = state.trial_ok + state.trial_failed
        state.trials_until = 0.0
    if state.admitted >= max(1, cfg.half_open_calls):
        return False, False
    state.admitted += 1
    if not state.trials_until:
        state.trials_until = now + cfg.probe_timeout_s
    return True, True


def record(state: BreakerState, ok: bool, now: float, cfg: BreakerConfig, n: int = 1) -> bool:
    """Record `n` outcomes; returns True when they opened the breaker.

    The caller records provider errors that say the model is unwell (5xx, timeouts,
    broken answers) and successes; never rate-limit answers.
    """
    if n <= 0:
        return False
    if state.open_until != 0.0:
        if now < state.open_until:
            return False  # calls that were in flight when it opened prove nothing
        if ok:
            state.trial_ok += n
        else:
            state.trial_failed += n
        verdict = trial_verdict(state.trial_ok, state.trial_failed, cfg)
        if verdict is True:
            state.open_until = 0.0
            state.streak = state.admitted = state.trial_ok = state.trial_failed = 0
            state.trials_until = 0.0
            state.buckets.clear()
        elif verdict is False:
            _open(state, now, cfg)
            return True
        return False
    counts = state.buckets.setdefault(_bucket(now, cfg), [0, 0])
    counts[0 if ok else 1] += n
    if ok:
        return False
    if should_open(*window_counts(state, now, cfg), cfg):
        _open(state, now, cfg)
        return True
    return False


def retry_in(state: BreakerState, now: float) -> float:
    """Seconds until the breaker lets calls through again (0: it does now, or may)."""
    return max(0.0, state.open_until - now) if state.open_until else 0.0


class Breakers(Protocol):
    config: BreakerConfig

    def allow(self, key: str) -> bool: ...

    def record(self, key: str, ok: bool) -> bool: ...

    def retry_in(self, key: str) -> float: ...

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

    def retry_in(self, key: str) -> float:
        with self._lock:
            s = self._states.get(key)
            return retry_in(s, time.time()) if s else 0.0

    remaining = retry_in

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        with self._lock:
            return {k: _describe(s, now, self.config) for k, s in self._states.items()}


def _describe(s: BreakerState, now: float, cfg: BreakerConfig) -> dict[str, Any]:
    state = "closed" if s.open_until == 0.0 else ("open" if now < s.open_until else "half_open")
    ok, failed = window_counts(s, now, cfg)
    return {"state": state, "opened": s.opened, "recent_failures": failed, "recent_ok": ok,
            "reopens_in_s": round(max(0.0, s.open_until - now), 1)}


# The Redis backend runs the same state machine inside one Lua script per call, on the
# server's clock, so concurrent workers on different hosts cannot race or disagree on time.
# ARGV: op, ok, n (outcomes to record), then the config. Returns, for 'allow': 0 no,
# 1 trial, 2 closed; for 'record': 1 opened, 0 not; for 'retry_in': milliseconds.
_LUA = """
local key, op, ok, n = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local min_calls, rate, window = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local cooldown, max_cooldown = tonumber(ARGV[7]), tonumber(ARGV[8])
local trials, probe_timeout, nbuckets = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local h = redis.call('HGETALL', key)
local s = {}
for i = 1, #h, 2 do s[h[i]] = tonumber(h[i + 1]) end
local open_until = s['open_until'] or 0
local wkey = key .. ':w'
local function open()
  local streak = (s['streak'] or 0) + 1
  local cd = math.min(max_cooldown, cooldown * 2 ^ (streak - 1))
  redis.call('HSET', key, 'open_until', now + cd, 'streak', streak, 'admitted', 0,
             'trial_ok', 0, 'trial_failed', 0, 'trials_until', 0)
  redis.call('HINCRBY', key, 'opened', 1)
  redis.call('DEL', wkey)
end
if op == 'retry_in' then
  if open_until == 0 then return 0 end
  return math.max(0, math.floor((open_until - now) * 1000))
end
if op == 'allow' then
  if open_until == 0 then return 2 end  -- closed: the caller may remember that briefly
  if now < open_until then return 0 end
  local admitted = s['admitted'] or 0
  local until_ = s['trials_until'] or 0
  if until_ > 0 and now >= until_ then
    admitted = (s['trial_ok'] or 0) + (s['trial_failed'] or 0)
    until_ = 0
  end
  if admitted >= math.max(1, trials) then
    redis.call('HSET', key, 'admitted', admitted, 'trials_until', until_)
    return 0
  end
  if until_ == 0 then until_ = now + probe_timeout end
  redis.call('HSET', key, 'admitted', admitted + 1, 'trials_until', until_)
  return 1
end
if n <= 0 then return 0 end
if open_until ~= 0 then
  if now < open_until then return 0 end
  local tok, tfail = s['trial_ok'] or 0, s['trial_failed'] or 0
  if ok == '1' then tok = tok + n else tfail = tfail + n end
  local nt = math.max(1, trials)
  local fail_limit = math.max(1, math.ceil(rate * nt))
  if tfail >= fail_limit then open() return 1 end
  if tok > nt - fail_limit then
    redis.call('HSET', key, 'open_until', 0, 'streak', 0, 'admitted', 0, 'trial_ok', 0,
               'trial_failed', 0, 'trials_until', 0)
    redis.call('DEL', wkey)
    return 0
  end
  redis.call('HSET', key, 'trial_ok', tok, 'trial_failed', tfail)
  return 0
end
local width = window / nbuckets
local b = math.floor(now / width)
redis.call('HINCRBY', wkey, (ok == '1' and 'o' or 'f') .. b, n)
redis.call('PEXPIRE', wkey, math.ceil(window * 1000) + 1000)
if ok == '1' then return 0 end
local w = redis.call('HGETALL', wkey)
local oks, fails = 0, 0
local first = b - nbuckets + 1
for i = 1, #w, 2 do
  local f = w[i]
  if tonumber(string.sub(f, 2)) < first then
    redis.call('HDEL', wkey, f)
  elseif string.sub(f, 1, 1) == 'o' then
    oks = oks + tonumber(w[i + 1])
  else
    fails = fails + tonumber(w[i + 1])
  end
end
local total = oks + fails
if total >= min_calls and fails >= rate * total then open() return 1 end
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
        # Redis. Shorter than the cooldown, so no open -> cooled -> trial sequence fits in it.
        self.closed_ttl_s = (min(CLOSED_TTL_S, self.config.cooldown_s / 2)
                             if closed_ttl_s is None else closed_ttl_s)
        self._closed_until: dict[str, float] = {}
        # Successes seen while "closed" is trusted: counted here and sent with this
        # process's next script call for the key, so the failure *rate* stays right
        # without a Redis round trip per success.
        self._pending_ok: dict[str, int] = {}
        self._lock = threading.Lock()

    def _run(self, key: str, op: str, ok: bool = False, n: int = 1) -> int:
        c = self.config
        return int(self._script(keys=[KEY_PREFIX + key],
                                args=[op, "1" if ok else "0", n, c.min_calls, c.failure_rate,
                                      c.window_s, c.cooldown_s, c.max_cooldown_s,
                                      c.half_open_calls, c.probe_timeout_s, BUCKETS]))

    def _trusted_closed(self, key: str) -> bool:
        return time.monotonic() < self._closed_until.get(key, 0.0)

    def _flush_ok(self, key: str) -> None:
        with self._lock:
            n = self._pending_ok.pop(key, 0)
        if n:
            self._run(key, "record", True, n)

    def allow(self, key: str) -> bool:
        """Two Redis calls per attempt (allow, record) were ~10% of a busy worker's CPU; a
        healthy model's breaker stays closed, so its answer is reused for ``closed_ttl_s``.
        The price: another worker's opening reaches this process that much later."""
        if self._trusted_closed(key):
            return True
        self._flush_ok(key)
        state = self._run(key, "allow")
        if state == 2:
            self._closed_until[key] = time.monotonic() + self.closed_ttl_s
        return state >= 1

    def record(self, key: str, ok: bool) -> bool:
        if ok and self._trusted_closed(key):
            with self._lock:
                self._pending_ok[key] = self._pending_ok.get(key, 0) + 1
            return False
        self._flush_ok(key)
        opened = self._run(key, "record", ok) == 1
        if opened or not ok:
            self._closed_until.pop(key, None)  # failing: ask Redis again from now on
        return opened

    def retry_in(self, key: str) -> float:
        return self._run(key, "retry_in") / 1000.0

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        out: dict[str, dict[str, Any]] = {}
        names = set()
        for raw in self.redis.scan_iter(match=KEY_PREFIX + "*"):
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            if not name.endswith(":failures"):  # (the old breaker's windows)
                names.add(name.removesuffix(":w"))
        for name in sorted(names):
            h = {(k.decode() if isinstance(k, bytes) else k): float(v)
                 for k, v in self.redis.hgetall(name).items()}
            state = BreakerState(open_until=h.get("open_until", 0.0),
                                 opened=int(h.get("opened", 0)))
            for f, v in self.redis.hgetall(name + ":w").items():
                f = f.decode() if isinstance(f, bytes) else str(f)
                counts = state.buckets.setdefault(int(f[1:]), [0, 0])
                counts[0 if f[0] == "o" else 1] += int(v)
            out[name.removeprefix(KEY_PREFIX)] = _describe(state, now, self.config)
        return out
