"""Global rate-limit pools: requests/min, tokens/min and in-flight requests per provider
(and per model), held across every worker process and host.

Why not Celery's ``rate_limit``: it is per worker, so N replicas send N times the limit,
which is the complaint LiteLLM and Celery users make. Here every check is one atomic Lua
call in Redis on the server's clock (``redis.call('TIME')``), so all workers on all hosts
share one view and no two clocks disagree.

Three layers, so the arithmetic is testable without Redis:

* pure math (:class:`Rate`, :func:`earliest`, :func:`commit`, :func:`adjust`): GCRA;
* backends with one interface: :class:`RedisBackend` (Lua, distributed) and
  :class:`MemoryBackend` (the embedded ``batchroute run``), like dramatiq's rate-limit
  backends. Both run the same algorithm; the Lua is a line-by-line transcription;
* :class:`Limiter`, what the pipeline calls: :meth:`Limiter.acquire` right before the
  provider call, :meth:`Limiter.settle` right after it (in a ``finally``).

**Strict under a sliding window.** Providers (and our simulator) refuse a request when
the last ``W`` seconds already hold ``L`` units. GCRA with emission interval
``I = (W + S) / (L + 1 - B)`` and tolerance ``tau = B * I`` (a bucket of ``B`` units) never
admits more than ``L`` units in any window of ``W`` seconds, even when each request
reaches the provider up to ``S`` seconds (the *safety margin*: scheduling and network
jitter) later than we admitted it. Proof sketch: the admissions in a window each occupy
``cost * I`` seconds of disjoint schedule lying in ``(start, end + tau]``, a span shorter
than ``W + S + tau``; so ``sum(cost) < L + 1``. It needs ``cost <= B``: requests use
``B = 1``; tokens use ``B`` = 1/60 of the allowance (one second's worth on a minute
window). A request bigger than ``B`` is admitted on a full bucket and is the one
case a strict window could see up to ``cost - B`` over. The price of strictness is
``(B - 1) / L + S / W`` of the allowance (about 2.5 % at tpm=60k, S=0.5 s).

**Reserve, then reconcile.** A call reserves ``prompt_tokens_est + max_tokens`` before
it starts. After it, the charge becomes the provider's reported prompt tokens plus the
``max_tokens`` the request asked for (what OpenAI and the simulator count against TPM),
or plus the reported completion tokens when the request set no cap; the difference
moves the bucket back (refund) or forward (debt). With a cap the refund is only the
prompt estimate's error, so strictness holds; without one the unused completion
allowance comes back a call's latency later, which a strict provider counting only
produced tokens could see as a brief overshoot (conservative in aggregate).

**Waiting without pinning workers.** A grant may start up to ``horizon_s`` (1 s) in the
future: the worker sleeps that long, holding its slot briefly. Anything longer is a
*deferral*: the job goes back to ``queued`` (same attempt number) and is re-published
with a countdown. Countdowns come from a shadow schedule (a second GCRA per limit that
only deferred jobs advance), so deferred jobs return paced at the rate the pool can
serve instead of all at once; they are capped at ``max_defer_s`` (300 s), far below the
broker's 3600 s visibility timeout, so an ETA message is never redelivered while held.

**Concurrency** is a sorted set of holders scored by lease expiry: a worker that dies
mid-call gives its slot back when the lease ends (provider timeout + 30 s).

**Provider feedback.** A 429 (its ``retry_after``, else 1 s) and ``remaining: 0``
rate-limit headers block the pool until the reset the provider gave (capped at 60 s).
Pools with no limits configured cost nothing: no Redis call, no feedback (their 429s are
left to the retry policy and the circuit breaker, as before).

Redis keys are ``batchroute:rl:{provider}[:model:<name>]:*``. The scripts derive sub-keys
from the base keys they are given; the ``{provider}`` hash tag keeps every key of one pool
in one Redis Cluster slot, which makes that legal.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import structlog

from batchroute import policy
from batchroute.completion import Completion, Usage
from batchroute.config import Config, ModelConfig, ProviderConfig
from batchroute.providers.base import ErrorKind, ProviderError
from batchroute.providers.base import _duration as parse_duration
from batchroute.tokens import max_completion

log = structlog.get_logger("batchroute.ratelimit")

KEY_PREFIX = "batchroute:rl:"
DEFAULT_SAFETY_S = 0.5
"""Margin for the delay between our admission and the provider counting the request."""
SLEEP_HORIZON_S = 1.0
"""Longest wait a worker sleeps through; longer waits put the job back on the queue."""
MAX_DEFER_S = 300.0
"""Longest countdown of a re-published job: well under the 3600 s visibility timeout."""
TOKEN_BURST_FRACTION = 1 / 60
"""Token bucket size as a share of tpm (see the module docstring)."""
LEASE_GRACE_S = 30.0
"""A concurrency slot's lease is the provider timeout plus this."""
DEFAULT_BLOCK_S = 1.0
"""How long a 429 without a retry-after blocks its pool."""
MAX_BLOCK_S = 60.0
MIN_POLL_S, MAX_POLL_S = 0.02, 0.25
"""Bounds of the in-worker wait between concurrency checks."""

GRANTED, RETRY, DEFER = "granted", "retry", "defer"


# ---- pure math ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Rate:
    """``limit`` units per ``window_s`` as GCRA parameters, strict under a sliding window
    whose requests arrive up to ``safety_s`` late (module docstring)."""

    limit: int
    window_s: float = 60.0
    burst: int = 1
    safety_s: float = 0.0

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if not 1 <= self.burst <= self.limit:
            raise ValueError(f"burst must be within 1..{self.limit}, got {self.burst}")
        if self.window_s <= 0 or self.safety_s < 0:
            raise ValueError("window_s must be > 0 and safety_s >= 0")

    @property
    def interval(self) -> float:
        """Seconds of schedule one unit occupies."""
        return (self.window_s + self.safety_s) / (self.limit + 1 - self.burst)

    @property
    def tolerance(self) -> float:
        """How far ahead of now the schedule may run: a full bucket of ``burst`` units."""
        return self.burst * self.interval


def earliest(tat: float, now: float, cost: float, rate: Rate) -> float:
    """When a request of ``cost`` units may start, given the theoretical arrival time
    ``tat`` of the schedule. A request bigger than the bucket starts on a full bucket."""
    tol = max(rate.tolerance, cost * rate.interval)
    return max(now, tat + cost * rate.interval - tol)


def commit(tat: float, start: float, cost: float, rate: Rate) -> float:
    """The schedule after admitting ``cost`` units at ``start``."""
    return max(tat, start) + cost * rate.interval


def adjust(tat: float, delta: float, rate: Rate) -> float:
    """The schedule after a reservation turned out ``delta`` units too small (or large)."""
    return tat + delta * rate.interval


def available(tat: float, now: float, rate: Rate) -> float:
    """Units that could start right now (the bucket's level)."""
    return max(0.0, (rate.tolerance - max(0.0, tat - now)) / rate.interval)


def token_burst(tpm: int, fraction: float = TOKEN_BURST_FRACTION) -> int:
    return max(1, min(tpm, math.ceil(tpm * fraction)))


def completion_cap(body: Mapping[str, Any]) -> int | None:
    """The max_tokens a request set explicitly (None: the provider's default applies)."""
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    return int(value) if isinstance(value, int) and value > 0 else None


def charged_tokens(usage: Usage, cap: int | None) -> int | None:
    """What the provider counted against TPM: the prompt it saw plus the completion
    allowance asked for, or the completion produced when none was asked for. None when
    the provider reported no usage (the reservation then stands)."""
    if usage.prompt_tokens <= 0 and usage.completion_tokens <= 0:
        return None
    return usage.prompt_tokens + (cap if cap is not None else usage.completion_tokens)


def header_block_s(headers: Mapping[str, str], now_wall: float | None = None) -> float:
    """Seconds the provider says a limit stays exhausted (``remaining: 0`` + its reset),
    from OpenAI-style or Anthropic-style rate-limit headers; 0 when nothing is exhausted.
    Behind LiteLLM's proxy they arrive prefixed ``llm_provider-``; unprefixed ones win."""
    h = {k.lower().removeprefix("llm_provider-"): v for k, v in headers.items()}
    h.update((k.lower(), v) for k, v in headers.items() if "llm_provider-" not in k.lower())
    block = 0.0
    for kind in ("requests", "tokens"):
        if _zero(h.get(f"x-ratelimit-remaining-{kind}")):
            block = max(block, parse_duration(h.get(f"x-ratelimit-reset-{kind}", "")) or 0.0)
    for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
        if _zero(h.get(f"anthropic-ratelimit-{kind}-remaining")):
            reset = h.get(f"anthropic-ratelimit-{kind}-reset", "")
            try:
                at = datetime.fromisoformat(reset.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
            block = max(block, at - (time.time() if now_wall is None else now_wall))
    return min(max(block, 0.0), MAX_BLOCK_S)


def _zero(value: str | None) -> bool:
    try:
        return value is not None and int(value) <= 0
    except ValueError:
        return False


# ---- pools ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scope:
    """One set of limits: a provider pool, or one model within it."""

    name: str  # "openai" or "openai/gpt-4o"
    key: str  # Redis key base
    window_s: float
    rpm: Rate | None = None
    tpm: Rate | None = None
    max_concurrency: int | None = None

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_concurrency)


def build_scope(name: str, key: str, window_s: float, rpm: int | None, tpm: int | None,
                max_concurrency: int | None, safety_s: float = DEFAULT_SAFETY_S,
                token_burst_fraction: float = TOKEN_BURST_FRACTION) -> Scope:
    return Scope(
        name=name, key=key, window_s=window_s,
        rpm=Rate(rpm, window_s, 1, safety_s) if rpm else None,
        tpm=Rate(tpm, window_s, token_burst(tpm, token_burst_fraction), safety_s)
        if tpm else None,
        max_concurrency=max_concurrency or None)


@dataclass(frozen=True)
class Request:
    """One acquisition, as a backend sees it."""

    cost: int  # tokens reserved
    holder: str  # concurrency holder id
    lease_s: float
    horizon_s: float = SLEEP_HORIZON_S
    max_defer_s: float = MAX_DEFER_S
    defer_only: bool = False  # the worker has waited long enough: queue it


@dataclass(frozen=True)
class Outcome:
    """A backend's answer. ``wait_s``: for GRANTED the sleep before calling, for RETRY the
    sleep before asking again, for DEFER the time until the job's turn in the shadow
    schedule (``capped``: beyond ``max_defer_s``, not given a turn)."""

    kind: str
    wait_s: float
    reason: str = ""  # rpm | tpm | concurrency | blocked
    now: float = 0.0  # the backend's clock when it decided
    capped: bool = False


class Backend(Protocol):
    def acquire(self, scopes: Sequence[Scope], req: Request) -> Outcome: ...

    def settle(self, scopes: Sequence[Scope], holder: str, delta: int, started_at: float,
               block: Sequence[bool], block_s: float) -> None: ...

    def usage(self, scope: Scope) -> dict[str, Any]: ...


def _limits(scope: Scope, cost: int) -> list[tuple[str, Rate, int]]:
    out: list[tuple[str, Rate, int]] = []
    if scope.rpm:
        out.append(("r", scope.rpm, 1))
    if scope.tpm:
        out.append(("t", scope.tpm, cost))
    return out


# ---- in-memory backend ----------------------------------------------------------------------

@dataclass
class _ScopeState:
    tat: dict[str, float] = field(default_factory=dict)  # "r"/"t" -> schedule
    shadow: dict[str, float] = field(default_factory=dict)  # "r"/"t"/"c" -> shadow schedule
    block: float = 0.0
    hold: float | None = None  # EWMA of how long a concurrency slot is held
    holders: dict[str, float] = field(default_factory=dict)  # holder -> lease expiry
    usage: dict[int, list[int]] = field(default_factory=dict)  # second -> [r, t, d]

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
            start = t0
            for s, st in zip(scopes, states, strict=True):
                for kind, rate, cost in _limits(s, req.cost):
                    e = earliest(st.tat.get(kind, 0.0), t0, cost, rate)
                    if e > start:
                        start, reason = e, ("rpm" if kind == "r" else "tpm")
            if not req.defer_only and start - now <= req.horizon_s:
                svc = 0.0
                for s, st in zip(scopes, states, strict=True):
                    if s.max_concurrency and st.in_flight(now) >= s.max_concurrency:
                        svc = max(svc, (st.hold or 1.0) / s.max_concurrency)
                if svc:
                    return Outcome(RETRY, svc, "concurrency", now)
                for s, st in zip(scopes, states, strict=True):
                    for kind, rate, cost in _limits(s, req.cost):
                        st.tat[kind] = commit(st.tat.get(kind, 0.0), start, cost, rate)
                    if s.max_concurrency:
                        st.holders[req.holder] = start + req.lease_s
                    st.count(now, s.window_s, r=1, t=req.cost)
                return Outcome(GRANTED, start - now, reason, now)
            return self._defer(scopes, states, req, now, start, reason)

    def _defer(self, scopes: Sequence[Scope], states: list[_ScopeState], req: Request,
               now: float, start: float, reason: str) -> Outcome:
        vstart = start
        for s, st in zip(scopes, states, strict=True):
            for kind, rate, cost in _limits(s, req.cost):
                v = max(st.shadow.get(kind, 0.0), st.tat.get(kind, 0.0))
                vstart = max(vstart, earliest(v, start, cost, rate))
            if s.max_concurrency:
                vstart = max(vstart, st.shadow.get("c", 0.0))
        capped = vstart - now > req.max_defer_s
        for s, st in zip(scopes, states, strict=True):
            if not capped:
                for kind, rate, cost in _limits(s, req.cost):
                    v = max(st.shadow.get(kind, 0.0), st.tat.get(kind, 0.0))
                    st.shadow[kind] = commit(v, vstart, cost, rate)
                if s.max_concurrency:
                    st.shadow["c"] = (max(st.shadow.get("c", 0.0), vstart)
                                      + (st.hold or 1.0) / s.max_concurrency)
            st.count(now, s.window_s, d=1)
        return Outcome(DEFER, vstart - now, reason or "concurrency", now, capped)

    def settle(self, scopes: Sequence[Scope], holder: str, delta: int, started_at: float,
               block: Sequence[bool], block_s: float) -> None:
        with self._lock:
            now = self.clock()
            for s, blk in zip(scopes, block, strict=True):
                st = self._state(s)
                if s.tpm and delta and "t" in st.tat:
                    st.tat["t"] = adjust(st.tat["t"], delta, s.tpm)
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
            return _usage_dict(scope, sum(r[0] for r in rows), sum(r[1] for r in rows),
                               sum(r[2] for r in rows), st.in_flight(now),
                               max(0.0, st.block - now))


def _usage_dict(scope: Scope, requests: int, tokens: int, deferred: int, in_flight: int,
                blocked_s: float) -> dict[str, Any]:
    return {
        "pool": scope.name, "window_s": scope.window_s,
        "requests": requests, "rpm": scope.rpm.limit if scope.rpm else None,
        "tokens": tokens, "tpm": scope.tpm.limit if scope.tpm else None,
        "in_flight": in_flight, "max_concurrency": scope.max_concurrency,
        "deferred": deferred, "blocked_s": round(blocked_s, 3),
    }


# ---- Redis backend --------------------------------------------------------------------------

# Shared Lua helpers. Numbers go back to Redis as strings: Redis truncates Lua numbers
# to integers. Times are seconds on the Redis server's clock, stored with microseconds.
_LUA_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function fmt(x) return string.format('%.6f', x) end
local function num(key, default)
  local v = redis.call('GET', key)
  if v then return tonumber(v) end
  return default
end
local function setexp(key, value, ttl)
  redis.call('SET', key, fmt(value), 'EX', math.max(1, math.ceil(ttl)))
end
local function earliest(tat, t0, c, I, tau)
  local tol = math.max(tau, c * I)
  return math.max(t0, tat + c * I - tol)
end
local function count(base, win, field, by)
  local k = base .. ':u:' .. math.floor(now)
  redis.call('HINCRBY', k, field, by)
  redis.call('EXPIRE', k, math.ceil(win) + 5)
end
"""

# KEYS: scope bases. ARGV: per scope (rI, rTau, tI, tTau, cmax, window), then
# cost, holder, lease, horizon, max_defer, defer_only. A 0 interval/cmax = no limit.
_ACQUIRE = _LUA_COMMON + """
local n = #KEYS
local G = n * 6
local cost = tonumber(ARGV[G + 1])
local holder = ARGV[G + 2]
local lease = tonumber(ARGV[G + 3])
local horizon = tonumber(ARGV[G + 4])
local max_defer = tonumber(ARGV[G + 5])
local defer_only = ARGV[G + 6] == '1'
local sc = {}
local t0, reason = now, ''
for i = 1, n do
  local b = (i - 1) * 6
  local s = {key = KEYS[i], rI = tonumber(ARGV[b + 1]), rT = tonumber(ARGV[b + 2]),
             tI = tonumber(ARGV[b + 3]), tT = tonumber(ARGV[b + 4]),
             cmax = tonumber(ARGV[b + 5]), win = tonumber(ARGV[b + 6])}
  local blocked = num(s.key .. ':block', 0)
  if blocked > t0 then t0 = blocked; reason = 'blocked' end
  s.tat_r = num(s.key .. ':tat:r', 0)
  s.tat_t = num(s.key .. ':tat:t', 0)
  sc[i] = s
end
local start = t0
for i = 1, n do
  local s = sc[i]
  if s.rI > 0 then
    local e = earliest(s.tat_r, t0, 1, s.rI, s.rT)
    if e > start then start = e; reason = 'rpm' end
  end
  if s.tI > 0 then
    local e = earliest(s.tat_t, t0, cost, s.tI, s.tT)
    if e > start then start = e; reason = 'tpm' end
  end
end
if (not defer_only) and start - now <= horizon then
  local svc = 0
  for i = 1, n do
    local s = sc[i]
    if s.cmax > 0 then
      local ck = s.key .. ':conc'
      redis.call('ZREMRANGEBYSCORE', ck, '-inf', now)
      if redis.call('ZCARD', ck) >= s.cmax then
        svc = math.max(svc, num(s.key .. ':hold', 1.0) / s.cmax)
      end
    end
  end
  if svc > 0 then return {'retry', fmt(svc), 'concurrency', fmt(now), '0'} end
  for i = 1, n do
    local s = sc[i]
    if s.rI > 0 then
      local v = math.max(s.tat_r, start) + s.rI
      setexp(s.key .. ':tat:r', v, v - now + 2)
    end
    if s.tI > 0 then
      local v = math.max(s.tat_t, start) + cost * s.tI
      setexp(s.key .. ':tat:t', v, v - now + 2)
    end
    if s.cmax > 0 then
      redis.call('ZADD', s.key .. ':conc', start + lease, holder)
      redis.call('EXPIRE', s.key .. ':conc', math.ceil(start - now + lease) + 5)
    end
    count(s.key, s.win, 'r', 1)
    count(s.key, s.win, 't', cost)
  end
  return {'granted', fmt(start - now), reason, fmt(now), '0'}
end
-- Deferred: find the job's turn in the shadow schedule (only deferred jobs advance it).
local vstart = start
for i = 1, n do
  local s = sc[i]
  if s.rI > 0 then
    s.v_r = math.max(num(s.key .. ':v:r', 0), s.tat_r)
    vstart = math.max(vstart, earliest(s.v_r, start, 1, s.rI, s.rT))
  end
  if s.tI > 0 then
    s.v_t = math.max(num(s.key .. ':v:t', 0), s.tat_t)
    vstart = math.max(vstart, earliest(s.v_t, start, cost, s.tI, s.tT))
  end
  if s.cmax > 0 then
    s.v_c = num(s.key .. ':v:c', 0)
    vstart = math.max(vstart, s.v_c)
  end
end
local capped = vstart - now > max_defer
for i = 1, n do
  local s = sc[i]
  if not capped then
    if s.rI > 0 then
      local v = math.max(s.v_r, vstart) + s.rI
      setexp(s.key .. ':v:r', v, v - now + 2)
    end
    if s.tI > 0 then
      local v = math.max(s.v_t, vstart) + cost * s.tI
      setexp(s.key .. ':v:t', v, v - now + 2)
    end
    if s.cmax > 0 then
      local v = math.max(s.v_c, vstart) + num(s.key .. ':hold', 1.0) / s.cmax
      setexp(s.key .. ':v:c', v, v - now + 2)
    end
  end
  count(s.key, s.win, 'd', 1)
end
if reason == '' then reason = 'concurrency' end
local c = '0'
if capped then c = '1' end
return {'defer', fmt(vstart - now), reason, fmt(now), c}
"""

# KEYS: scope bases. ARGV: per scope (tI, cmax, block?, window), then holder, delta,
# started_at, block_s.
_SETTLE = _LUA_COMMON + """
local n = #KEYS
local G = n * 4
local holder = ARGV[G + 1]
local delta = tonumber(ARGV[G + 2])
local started = tonumber(ARGV[G + 3])
local block_s = tonumber(ARGV[G + 4])
for i = 1, n do
  local b = (i - 1) * 4
  local key, tI, cmax = KEYS[i], tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local blk, win = ARGV[b + 3] == '1', tonumber(ARGV[b + 4])
  if tI > 0 and delta ~= 0 then
    local tat = redis.call('GET', key .. ':tat:t')
    if tat then
      local v = tonumber(tat) + delta * tI
      setexp(key .. ':tat:t', v, v - now + 2)
      count(key, win, 't', delta)
    end
  end
  if cmax > 0 and redis.call('ZREM', key .. ':conc', holder) == 1 and started > 0 then
    local held = math.max(0, now - started)
    local old = redis.call('GET', key .. ':hold')
    if old then held = 0.8 * tonumber(old) + 0.2 * held end
    setexp(key .. ':hold', held, 3600)
  end
  if blk and block_s > 0 then
    local until_ = now + block_s
    if until_ > num(key .. ':block', 0) then setexp(key .. ':block', until_, block_s + 1) end
  end
end
return 1
"""

# KEYS[1]: scope base. ARGV[1]: window. Returns requests, tokens, deferrals in the window,
# holders in flight and seconds the pool stays blocked.
_USAGE = _LUA_COMMON + """
local key, win = KEYS[1], tonumber(ARGV[1])
local r, tk, d = 0, 0, 0
local sec = math.floor(now)
for s = sec - math.ceil(win) + 1, sec do
  local v = redis.call('HMGET', key .. ':u:' .. s, 'r', 't', 'd')
  r = r + (tonumber(v[1]) or 0)
  tk = tk + (tonumber(v[2]) or 0)
  d = d + (tonumber(v[3]) or 0)
end
local inflight = redis.call('ZCOUNT', key .. ':conc', '(' .. fmt(now), '+inf')
return {tostring(r), tostring(tk), tostring(d), tostring(inflight),
        fmt(math.max(0, num(key .. ':block', 0) - now))}
"""


def _f(x: float) -> str:
    return repr(float(x))


class RedisBackend:
    """Pools shared by every worker process and host: one Lua call per check."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._acquire = redis.register_script(_ACQUIRE)
        self._settle = redis.register_script(_SETTLE)
        self._usage = redis.register_script(_USAGE)

    @classmethod
    def from_url(cls, url: str) -> RedisBackend:
        import redis

        return cls(redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10))

    def acquire(self, scopes: Sequence[Scope], req: Request) -> Outcome:
        args: list[str] = []
        for s in scopes:
            args += [_f(s.rpm.interval if s.rpm else 0), _f(s.rpm.tolerance if s.rpm else 0),
                     _f(s.tpm.interval if s.tpm else 0), _f(s.tpm.tolerance if s.tpm else 0),
                     str(s.max_concurrency or 0), _f(s.window_s)]
        args += [str(req.cost), req.holder, _f(req.lease_s), _f(req.horizon_s),
                 _f(req.max_defer_s), "1" if req.defer_only else "0"]
        kind, wait, reason, now, capped = (
            x.decode() if isinstance(x, bytes) else str(x)
            for x in self._acquire(keys=[s.key for s in scopes], args=args))
        return Outcome(kind, float(wait), reason, float(now), capped == "1")

    def settle(self, scopes: Sequence[Scope], holder: str, delta: int, started_at: float,
               block: Sequence[bool], block_s: float) -> None:
        args: list[str] = []
        for s, blk in zip(scopes, block, strict=True):
            args += [_f(s.tpm.interval if s.tpm else 0), str(s.max_concurrency or 0),
                     "1" if blk else "0", _f(s.window_s)]
        args += [holder, str(int(delta)), _f(started_at), _f(block_s)]
        self._settle(keys=[s.key for s in scopes], args=args)

    def usage(self, scope: Scope) -> dict[str, Any]:
        r, t, d, inflight, blocked = (
            x.decode() if isinstance(x, bytes) else str(x)
            for x in self._usage(keys=[scope.key], args=[_f(scope.window_s)]))
        return _usage_dict(scope, int(r), int(t), int(d), int(inflight), float(blocked))


def redis_url() -> str:
    """Where the pools live: $BATCHROUTE_RATELIMIT_URL, else the broker's Redis."""
    from batchroute.broker import broker_url

    return os.environ.get("BATCHROUTE_RATELIMIT_URL") or broker_url()


# ---- what the pipeline calls ----------------------------------------------------------------

class JobLike(Protocol):
    """What the limiter needs of a job (``store.Job`` has it)."""

    id: str
    batch_id: str
    attempt_no: int
    body: dict[str, Any]
    prompt_tokens_est: int


@dataclass(frozen=True)
class Grant:
    """The result of :meth:`Limiter.acquire`: go ahead (already waited ``waited_s``), or,
    when ``defer_s`` is set, put the job back for that long. Pass it to ``settle``."""

    scopes: tuple[Scope, ...] = ()
    holder: str = ""
    reserved: int = 0
    cap: int | None = None
    started_at: float = 0.0
    waited_s: float = 0.0
    defer_s: float | None = None
    reason: str = ""
    batch_id: str = ""
    job_id: str = ""

    @property
    def pool(self) -> str:
        return self.scopes[-1].name if self.scopes else ""

    @property
    def deferred(self) -> bool:
        return self.defer_s is not None


class Limiter:
    """Per-model pools from the routing config, checked through one backend."""

    def __init__(self, config: Config, backend: Backend, *,
                 safety_s: float = DEFAULT_SAFETY_S, horizon_s: float = SLEEP_HORIZON_S,
                 max_defer_s: float = MAX_DEFER_S,
                 token_burst_fraction: float = TOKEN_BURST_FRACTION,
                 sleep: Callable[[float], None] = time.sleep,
                 rng: Callable[[], float] = random.random) -> None:
        self.config = config
        self.backend = backend
        self.safety_s = safety_s
        self.horizon_s = horizon_s
        self.max_defer_s = max_defer_s
        self.token_burst_fraction = token_burst_fraction
        self._sleep = sleep
        self._rng = rng
        self._scopes = {m.name: self._build(m) for m in config.models.values()}

    @classmethod
    def from_env(cls, config: Config, **kwargs: Any) -> Limiter:
        """Redis pools when the rate-limit URL (or the broker) is Redis; else per process."""
        url = redis_url()
        if url.startswith(("redis://", "rediss://", "unix://")):
            return cls(config, RedisBackend.from_url(url), **kwargs)
        log.warning("ratelimit_not_shared", url_scheme=url.split(":", 1)[0],
                    hint="limits hold per process only; set BATCHROUTE_RATELIMIT_URL")
        return cls(config, MemoryBackend(), **kwargs)

    def _build(self, model: ModelConfig) -> tuple[Scope, ...]:
        p = self.config.provider_of(model)
        if p.rate_window_s <= 0:
            raise ValueError(f"providers.{p.name}.rate_window_s must be > 0")
        base = f"{KEY_PREFIX}{{{p.name}}}"
        scopes = [
            build_scope(p.name, base, p.rate_window_s, p.rpm, p.tpm, p.max_concurrency,
                        self.safety_s, self.token_burst_fraction),
            build_scope(f"{p.name}/{model.name}", f"{base}:model:{model.name}",
                        p.rate_window_s, model.rpm, model.tpm, model.max_concurrency,
                        self.safety_s, self.token_burst_fraction),
        ]
        return tuple(s for s in scopes if s.limited)

    def scopes(self, model: ModelConfig) -> tuple[Scope, ...]:
        """The model's pools: its provider's, then its own (only those with limits)."""
        found = self._scopes.get(model.name)
        return found if found is not None else self._build(model)

    def pools(self) -> list[Scope]:
        """Every limited scope once, provider pools first."""
        seen: dict[str, Scope] = {}
        for scopes in self._scopes.values():
            for s in scopes:
                seen.setdefault(s.name, s)
        return sorted(seen.values(), key=lambda s: (s.name.count("/"), s.name))

    def acquire(self, model: ModelConfig, provider: ProviderConfig, job: JobLike) -> Grant:
        """Take capacity for one call of ``job`` to ``model``, sleeping at most
        ``horizon_s`` for it; or return a deferral. Unlimited pools cost nothing (no Redis
        call), so configs without limits behave exactly as before."""
        scopes = self.scopes(model)
        if not scopes:
            return Grant()
        cost = job.prompt_tokens_est + max_completion(job.body)
        cap = completion_cap(job.body)
        holder = f"{job.id}:{job.attempt_no}:{uuid.uuid4().hex[:8]}"
        ids = {"batch_id": job.batch_id, "job_id": job.id}
        req = Request(cost=cost, holder=holder, lease_s=provider.timeout_s + LEASE_GRACE_S,
                      horizon_s=self.horizon_s, max_defer_s=self.max_defer_s)
        waited = 0.0
        while True:
            out = self.backend.acquire(scopes, req)
            if out.kind == GRANTED:
                if out.wait_s > 0:
                    log.debug("ratelimit_wait", **ids, pool=scopes[-1].name,
                              wait_s=round(out.wait_s, 3), reason=out.reason)
                    self._sleep(out.wait_s)
                return Grant(scopes, holder, cost, cap, out.now + out.wait_s,
                             waited + out.wait_s, None, out.reason, **ids)
            if out.kind == RETRY:
                pause = min(max(out.wait_s, MIN_POLL_S), MAX_POLL_S)
                self._sleep(pause)
                waited += pause
                if waited >= self.horizon_s:
                    req = Request(cost, holder, req.lease_s, req.horizon_s, req.max_defer_s,
                                  defer_only=True)
                continue
            if out.capped:
                countdown = self.max_defer_s * (0.5 + 0.5 * self._rng())
            else:
                # Come back a little early: the last stretch is slept through in the worker.
                countdown = max(out.wait_s - self.horizon_s / 2, self.horizon_s / 2)
            return Grant(scopes, holder, cost, cap, 0.0, waited,
                         round(min(countdown, self.max_defer_s), 3), out.reason, **ids)

    def settle(self, grant: Grant, completion: Completion | None = None,
               error: ProviderError | None = None) -> None:
        """Reconcile the reservation with the provider's usage, release the concurrency
        slot and feed the provider's 429s and rate-limit headers back into the pool.
        Never raises: a lost settle costs at most one lease and one reservation."""
        if not grant.scopes or grant.deferred:
            return
        delta, block_s = 0, 0.0
        if completion is not None:
            charged = charged_tokens(completion.usage, grant.cap)
            delta = 0 if charged is None else charged - grant.reserved
            block_s = header_block_s(completion.rate_limit)
        elif error is not None and error.kind is ErrorKind.RATE_LIMITED:
            # safe_wait: a Retry-After of inf/nan/negative must not reach the backend.
            block_s = min(policy.safe_wait(error.retry_after) or DEFAULT_BLOCK_S, MAX_BLOCK_S)
        # Block the narrowest pool we know: the model's own limits if it has them.
        narrow = len(grant.scopes) - 1
        block = [i == narrow for i in range(len(grant.scopes))]
        try:
            self.backend.settle(grant.scopes, grant.holder, delta, grant.started_at, block,
                                block_s)
        except Exception:  # never fail a finished call over bookkeeping
            log.warning("ratelimit_settle_failed", batch_id=grant.batch_id,
                        job_id=grant.job_id, pool=grant.pool, exc_info=True)
            return
        if block_s > 0:
            log.info("pool_blocked_by_provider", batch_id=grant.batch_id, job_id=grant.job_id,
                     pool=grant.scopes[narrow].name,
                     seconds=round(block_s, 3),
                     cause="429" if error is not None else "rate-limit headers")

    def usage(self) -> list[dict[str, Any]]:
        """Each pool's use in its current window against its limits (for ``status``)."""
        return [self.backend.usage(s) for s in self.pools()]


def pool_status(config: Config, url: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """Every limited pool's use for ``batchroute status``: (rows, problem). Best effort:
    status must still show the batch when Redis cannot be reached."""
    limiter_scopes = Limiter(config, MemoryBackend()).pools()
    if not limiter_scopes:
        return [], None
    try:
        backend = RedisBackend.from_url(url or redis_url())
        rows = [backend.usage(s) for s in limiter_scopes]
    except Exception as e:  # redis.RedisError, or a broker URL that is not Redis
        return [], f"rate-limit pools unavailable ({type(e).__name__}: {e})"
    for row in rows:
        for used, limit in (("requests", "rpm"), ("tokens", "tpm"),
                            ("in_flight", "max_concurrency")):
            row[f"{used}_pct"] = (round(100 * row[used] / row[limit], 1) if row[limit]
                                  else None)
    return rows, None
