"""Global rate-limit pools: requests/min, tokens/min and in-flight requests per provider
(and per model), held across every worker process and host.

Why not Celery's ``rate_limit``: it is per worker, so N replicas send N times the limit,
which is the complaint LiteLLM and Celery users make. Here every check is one atomic Lua
call in Redis on the server's clock (``redis.call('TIME')``), so all workers on all hosts
share one view and no two clocks disagree.

Modules, so the arithmetic is testable without Redis:

* ``schedule``: pure math: the provider's sliding window (:func:`window_start`) and the
  shadow schedule of waiting jobs (GCRA: :class:`Rate`, :func:`earliest`, :func:`commit`);
* ``pools``: a pool's limits (:class:`Scope`) and the :class:`Backend` interface;
* ``memory`` / ``redis_backend``: :class:`MemoryBackend` (the embedded ``batchroute run``)
  and :class:`RedisBackend` (Lua, distributed), like dramatiq's rate-limit backends.
  Both run the same algorithm; the Lua is a line-by-line transcription;
* ``limiter``: :class:`Limiter`, what the pipeline calls: :meth:`Limiter.acquire` right
  before the provider call, :meth:`Limiter.settle` right after it (in a ``finally``: a
  call holds its window entries until it settles);
* ``feedback``: what the provider reports back (usage, rate-limit headers).

**The whole allowance, strictly.** Providers (and our simulator) refuse a request when
the last ``W`` seconds already hold ``L`` units, counted when the request arrives. A
pool keeps the same sliding window, ``W`` long, over the *latest time each request may
have arrived*: its admission plus its deadline while in flight, its reply's time once it
settled (the reply proves it arrived). So a fresh pool spends the window's full
allowance at once and then paces as the provider's window frees up, a call's latency
behind it (``L / (W + latency)``: 0.5% at 50 ms on 10 s windows), and no stall between
our admission and the provider's counter can cause a 429 (proof in ``schedule``; times
on Redis' clock). The delay a call counts with is capped (``rate_safety_s``, default
2 s): calls slower than that count at admission + 2 s, so long calls do not pace a
call's latency behind the window; strictness then holds for requests that reach the
provider within 2 s of their admission.

**Reserve, then reconcile.** A call reserves ``prompt_tokens_est + max_tokens`` before
it starts. After it, the charge becomes the provider's reported prompt tokens plus the
``max_tokens`` the request asked for (what OpenAI and the simulator count against TPM),
or plus the reported completion tokens when the request set no cap; the difference
corrects the request's entry in the window, where it is logged (refund or
debt). With a cap the correction is only the prompt estimate's error, so strictness
holds; without one the unused completion allowance comes back a call's latency later,
which a strict provider counting only produced tokens could see as a brief overshoot.

**Waiting without pinning workers.** A grant may start up to ``horizon_s`` (1 s) in the
future: the worker sleeps that long, holding its slot briefly. Anything longer is a
*deferral*: the job goes back to ``queued`` (same attempt number) and is re-published
with a countdown. Countdowns come from a shadow schedule (per limit, that only deferred
jobs advance: a window's allowance, refilled at the limit's rate, from when the window
frees up), so deferred jobs return a window's worth at a time instead of all at once;
they are capped at ``max_defer_s`` (300 s), far below the broker's 3600 s visibility
timeout, so an ETA message is never redelivered while held.

**Concurrency** is a sorted set of holders scored by lease expiry: a worker that dies
mid-call gives its slot back when the lease ends (provider timeout + 30 s).

**Provider feedback.** A 429 (its ``retry_after``, else 1 s) and ``remaining: 0``
rate-limit headers block the pool until the reset the provider gave (capped at 60 s).
Pools with no limits configured cost nothing: no Redis call, no feedback (their 429s are
left to the retry policy and the circuit breaker, as before).

Redis keys are ``batchroute:rl:{provider}[:model:<name>]:*`` (see ``redis_backend``).
The scripts derive sub-keys from the base keys they are given; the ``{provider}`` hash
tag keeps every key of one pool in one Redis Cluster slot, which makes that legal.
"""

from __future__ import annotations

from batchroute.ratelimit.feedback import charged_tokens, completion_cap, header_block_s
from batchroute.ratelimit.limiter import Grant, JobLike, Limiter, pool_status
from batchroute.ratelimit.memory import MemoryBackend
from batchroute.ratelimit.pools import Backend, Outcome, Request, Scope, build_scope
from batchroute.ratelimit.redis_backend import RedisBackend, redis_url
from batchroute.ratelimit.schedule import (
    DEFAULT_BLOCK_S,
    DEFAULT_SAFETY_S,
    DEFER,
    GRANTED,
    KEY_PREFIX,
    LEASE_GRACE_S,
    MAX_BLOCK_S,
    MAX_DEFER_S,
    RETRY,
    SLEEP_HORIZON_S,
    TOKEN_BURST_FRACTION,
    Pace,
    Rate,
    adjust,
    available,
    commit,
    earliest,
    token_burst,
    window_start,
)

__all__ = [
    "DEFAULT_BLOCK_S", "DEFAULT_SAFETY_S", "DEFER", "GRANTED", "KEY_PREFIX", "LEASE_GRACE_S",
    "MAX_BLOCK_S", "MAX_DEFER_S", "RETRY", "SLEEP_HORIZON_S", "TOKEN_BURST_FRACTION",
    "Backend", "Grant", "JobLike", "Limiter", "MemoryBackend", "Outcome", "Pace", "Rate",
    "RedisBackend", "Request", "Scope", "adjust", "available", "build_scope",
    "charged_tokens", "commit", "completion_cap", "earliest", "header_block_s",
    "pool_status", "redis_url", "token_burst", "window_start",
]
