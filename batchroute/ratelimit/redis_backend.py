"""Pools shared by every worker process and host: one atomic Lua call per check, on the
Redis server's clock, a line-by-line transcription of `batchroute.ratelimit.memory`.

Keys (base ``batchroute:rl:{provider}[:model:<name>]``): ``:log:r`` / ``:log:t`` sorted
sets of admitted holders scored by the latest time each may reach the provider (``start +
bound`` in flight, lowered to the settle time: ``schedule``), ``:cost:t`` their tokens, ``:sum:t``
the tokens in the window, ``:v:*`` the shadow schedules, ``:conc`` the concurrency
holders, ``:block``, ``:hold`` and ``:u:<second>`` usage counters.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from batchroute.ratelimit.pools import Outcome, Request, Scope, span, usage_dict
from batchroute.ratelimit.schedule import TURN_KEPT_S

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
-- Drop what left the window; returns the units still in it.
local function prune(base, kind, sp)
  local lk = base .. ':log:' .. kind
  if kind == 'r' then
    redis.call('ZREMRANGEBYSCORE', lk, '-inf', now - sp)
    return redis.call('ZCARD', lk)
  end
  local old = redis.call('ZRANGEBYSCORE', lk, '-inf', now - sp)
  local total = num(base .. ':sum:t', 0)
  if #old > 0 then
    local costs = redis.call('HMGET', base .. ':cost:t', unpack(old))
    for i = 1, #old do total = total - (tonumber(costs[i]) or 0) end
    redis.call('HDEL', base .. ':cost:t', unpack(old))
    redis.call('ZREMRANGEBYSCORE', lk, '-inf', now - sp)
    if total < 0 then total = 0 end
    redis.call('SET', base .. ':sum:t', fmt(total))
  end
  return total
end
-- The earliest start >= t0 at which c more units fit in the window (memory.window_start);
-- each logged time taken as at most clamp (now: calls in flight as if settled now).
local function wstart(base, kind, total, t0, c, limit, sp, clamp)
  local need = total + c - limit
  if need <= 0 then return t0 end
  local lk = base .. ':log:' .. kind
  if kind == 'r' then
    local n = redis.call('ZCARD', lk)
    local idx = math.min(n, math.ceil(need)) - 1
    local e = redis.call('ZRANGE', lk, idx, idx, 'WITHSCORES')
    return math.max(t0, math.min(tonumber(e[2]), clamp) + sp + 0.000001)
  end
  local freed, latest, from = 0, -1e300, 0
  while true do
    local e = redis.call('ZRANGE', lk, from, from + 99, 'WITHSCORES')
    if #e == 0 then break end
    local names = {}
    for i = 1, #e, 2 do names[#names + 1] = e[i] end
    local costs = redis.call('HMGET', base .. ':cost:t', unpack(names))
    for i = 1, #names do
      freed = freed + (tonumber(costs[i]) or 0)
      latest = math.max(latest, math.min(tonumber(e[2 * i]), clamp))
      if freed >= need then return math.max(t0, latest + sp + 0.000001) end
    end
    from = from + 100
  end
  return math.max(t0, latest + sp + 0.000001)
end
"""

# KEYS: scope bases. ARGV: per scope (rLimit, tLimit, span, cmax, window, cap), then
# cost, holder, lease, horizon, max_defer, defer_only, job_key, turn_kept, bound. 0
# limit/cmax: none; cap < 0: none.
_ACQUIRE = _LUA_COMMON + """
local n = #KEYS
local G = n * 6
local cost = tonumber(ARGV[G + 1])
local holder = ARGV[G + 2]
local lease = tonumber(ARGV[G + 3])
local horizon = tonumber(ARGV[G + 4])
local max_defer = tonumber(ARGV[G + 5])
local defer_only = ARGV[G + 6] == '1'
local job_key = ARGV[G + 7]
local turn_kept = tonumber(ARGV[G + 8])
local bound = tonumber(ARGV[G + 9])
local sc = {}
local t0, reason = now, ''
for i = 1, n do
  local b = (i - 1) * 6
  local s = {key = KEYS[i], rL = tonumber(ARGV[b + 1]), tL = tonumber(ARGV[b + 2]),
             sp = tonumber(ARGV[b + 3]), cmax = tonumber(ARGV[b + 4]),
             win = tonumber(ARGV[b + 5]), cap = tonumber(ARGV[b + 6])}
  local blocked = num(s.key .. ':block', 0)
  if blocked > t0 then t0 = blocked; reason = 'blocked' end
  if s.rL > 0 then s.tot_r = prune(s.key, 'r', s.sp) end
  if s.tL > 0 then s.tot_t = prune(s.key, 't', s.sp) end
  sc[i] = s
end
-- start: safe to sleep until; soon: the earliest it could become safe, if the calls in
-- flight settled now (what a job is put back for).
local start, soon = t0, t0
for i = 1, n do
  local s = sc[i]
  if s.rL > 0 then
    local e = wstart(s.key, 'r', s.tot_r, t0, 1, s.rL, s.sp, math.huge)
    if e > start then start = e; reason = 'rpm' end
    soon = math.max(soon, wstart(s.key, 'r', s.tot_r, t0, 1, s.rL, s.sp, now))
  end
  if s.tL > 0 then
    local e = wstart(s.key, 't', s.tot_t, t0, cost, s.tL, s.sp, math.huge)
    if e > start then start = e; reason = 'tpm' end
    soon = math.max(soon, wstart(s.key, 't', s.tot_t, t0, cost, s.tL, s.sp, now))
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
    local logged = start + bound
    if s.cap >= 0 then logged = start + math.min(s.cap, bound) end
    local ttl = math.ceil(logged - now + s.sp) + 5
    if s.rL > 0 then
      redis.call('ZADD', s.key .. ':log:r', fmt(logged), holder)
      redis.call('EXPIRE', s.key .. ':log:r', ttl)
    end
    if s.tL > 0 then
      redis.call('ZADD', s.key .. ':log:t', fmt(logged), holder)
      redis.call('HSET', s.key .. ':cost:t', holder, cost)
      redis.call('SET', s.key .. ':sum:t', fmt(s.tot_t + cost))
      for _, k in ipairs({':log:t', ':cost:t', ':sum:t'}) do
        redis.call('EXPIRE', s.key .. k, ttl)
      end
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
if (not defer_only) and soon - now <= horizon then  -- a call about to settle
  return {'retry', fmt(soon - now), reason, fmt(now), '0'}
end
start = soon
if reason == '' then reason = 'concurrency' end
-- Deferred again after its turn (it came back before the window had room): rejoin.
local tkey = KEYS[1] .. ':turned:' .. job_key
if job_key ~= '' and redis.call('EXISTS', tkey) == 1 then
  for i = 1, n do count(sc[i].key, sc[i].win, 'd', 1) end
  local c = '0'
  if start - now > max_defer then c = '1' end
  return {'defer', fmt(start - now), reason, fmt(now), c}
end
-- Deferred: find the job's turn in the shadow schedule (only deferred jobs advance it):
-- a bucket of a window's allowance refilled at limit / span.
local vstart = start
for i = 1, n do
  local s = sc[i]
  if s.rL > 0 then
    s.v_r = num(s.key .. ':v:r', 0)
    vstart = math.max(vstart, earliest(s.v_r, start, 1, s.sp / s.rL, s.sp))
  end
  if s.tL > 0 then
    s.v_t = num(s.key .. ':v:t', 0)
    vstart = math.max(vstart, earliest(s.v_t, start, cost, s.sp / s.tL, s.sp))
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
    if s.rL > 0 then
      local v = math.max(s.v_r, vstart) + s.sp / s.rL
      setexp(s.key .. ':v:r', v, v - now + 2)
    end
    if s.tL > 0 then
      local v = math.max(s.v_t, vstart) + cost * s.sp / s.tL
      setexp(s.key .. ':v:t', v, v - now + 2)
    end
    if s.cmax > 0 then
      local v = math.max(s.v_c, vstart) + num(s.key .. ':hold', 1.0) / s.cmax
      setexp(s.key .. ':v:c', v, v - now + 2)
    end
  end
  count(s.key, s.win, 'd', 1)
end
local c = '0'
if capped then c = '1' end
if job_key ~= '' and not capped then
  redis.call('SET', tkey, '1', 'EX', math.ceil(vstart - now + turn_kept))
end
return {'defer', fmt(vstart - now), reason, fmt(now), c}
"""

# KEYS: scope bases. ARGV: per scope (tLimit, cmax, block?, window, rLimit), then holder,
# delta, started_at, block_s, lead_s.
_SETTLE = _LUA_COMMON + """
local n = #KEYS
local G = n * 5
local holder = ARGV[G + 1]
local delta = tonumber(ARGV[G + 2])
local started = tonumber(ARGV[G + 3])
local block_s = tonumber(ARGV[G + 4])
-- Dated earlier by the time the provider held it after counting it (schedule.settle_lead).
local lead = tonumber(ARGV[G + 5]) or 0
if lead ~= lead or lead < 0 or lead == math.huge then lead = 0 end
if started > 0 then lead = math.min(lead, math.max(0, now - started)) end
local counted = now - lead
for i = 1, n do
  local b = (i - 1) * 5
  local key, tL, cmax = KEYS[i], tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local blk, win, rL = ARGV[b + 3] == '1', tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
  -- Settled: it reached the provider by now (schedule.settled_at). LT: never later.
  if rL > 0 then redis.call('ZADD', key .. ':log:r', 'XX', 'LT', fmt(counted), holder) end
  if tL > 0 then redis.call('ZADD', key .. ':log:t', 'XX', 'LT', fmt(counted), holder) end
  if tL > 0 and delta ~= 0 then
    local old = redis.call('HGET', key .. ':cost:t', holder)
    if old then
      local new = math.max(0, tonumber(old) + delta)
      redis.call('HSET', key .. ':cost:t', holder, new)
      local sum = math.max(0, num(key .. ':sum:t', 0) + new - tonumber(old))
      redis.call('SET', key .. ':sum:t', fmt(sum), 'KEEPTTL')
      count(key, win, 't', new - tonumber(old))
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
            rate = s.rpm or s.tpm
            args += [str(s.rpm.limit if s.rpm else 0), str(s.tpm.limit if s.tpm else 0),
                     _f(span(rate) if rate else s.window_s), str(s.max_concurrency or 0),
                     _f(s.window_s), _f(-1.0 if s.arrival_cap_s is None else s.arrival_cap_s)]
        args += [str(req.cost), req.holder, _f(req.lease_s), _f(req.horizon_s),
                 _f(req.max_defer_s), "1" if req.defer_only else "0", req.job_key,
                 _f(TURN_KEPT_S), _f(req.in_flight_s)]
        kind, wait, reason, now, capped = (
            x.decode() if isinstance(x, bytes) else str(x)
            for x in self._acquire(keys=[s.key for s in scopes], args=args))
        return Outcome(kind, float(wait), reason, float(now), capped == "1")

    def settle(self, scopes: Sequence[Scope], holder: str, delta: int, started_at: float,
               block: Sequence[bool], block_s: float, lead_s: float = 0.0) -> None:
        args: list[str] = []
        for s, blk in zip(scopes, block, strict=True):
            args += [str(s.tpm.limit if s.tpm else 0), str(s.max_concurrency or 0),
                     "1" if blk else "0", _f(s.window_s), str(s.rpm.limit if s.rpm else 0)]
        args += [holder, str(int(delta)), _f(started_at), _f(block_s), _f(lead_s)]
        self._settle(keys=[s.key for s in scopes], args=args)

    def usage(self, scope: Scope) -> dict[str, Any]:
        r, t, d, inflight, blocked = (
            x.decode() if isinstance(x, bytes) else str(x)
            for x in self._usage(keys=[scope.key], args=[_f(scope.window_s)]))
        return usage_dict(scope, int(r), int(t), int(d), int(inflight), float(blocked))


def redis_url() -> str:
    """Where the pools live: $BATCHROUTE_RATELIMIT_URL, else the broker's Redis."""
    from batchroute.broker import broker_url

    return os.environ.get("BATCHROUTE_RATELIMIT_URL") or broker_url()
