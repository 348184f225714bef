"""What the pipeline calls: `Limiter.acquire` right before the provider call,
`Limiter.settle` right after it (in a ``finally``)."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import structlog

from batchroute import policy
from batchroute.completion import Completion
from batchroute.config import Config, ModelConfig, ProviderConfig
from batchroute.providers.base import ErrorKind, ProviderError
from batchroute.ratelimit.feedback import charged_tokens, completion_cap, header_block_s
from batchroute.ratelimit.memory import MemoryBackend
from batchroute.ratelimit.pools import Backend, Request, Scope, build_scope
from batchroute.ratelimit.redis_backend import RedisBackend, redis_url
from batchroute.ratelimit.schedule import (
    DEFAULT_BLOCK_S,
    DEFAULT_SAFETY_S,
    GRANTED,
    KEY_PREFIX,
    LEASE_GRACE_S,
    MAX_BLOCK_S,
    MAX_DEFER_S,
    MAX_POLL_S,
    MIN_POLL_S,
    RETRY,
    SLEEP_HORIZON_S,
    TOKEN_BURST_FRACTION,
)
from batchroute.tokens import max_completion

log = structlog.get_logger("batchroute.ratelimit")

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
                 safety_s: float | None = DEFAULT_SAFETY_S, horizon_s: float = SLEEP_HORIZON_S,
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
        safety = self.safety_s if p.rate_safety_s is None else p.rate_safety_s
        scopes = [
            build_scope(p.name, base, p.rate_window_s, p.rpm, p.tpm, p.max_concurrency,
                        safety, self.token_burst_fraction),
            build_scope(f"{p.name}/{model.name}", f"{base}:model:{model.name}",
                        p.rate_window_s, model.rpm, model.tpm, model.max_concurrency,
                        safety, self.token_burst_fraction),
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
                      horizon_s=self.horizon_s, max_defer_s=self.max_defer_s,
                      job_key=f"{job.id}:{job.attempt_no}",
                      bound_s=provider.deadline_s + LEASE_GRACE_S)
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
                    req = replace(req, defer_only=True)
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
        """Reconcile the reservation with the provider's usage, log the call at its settle
        time (it reached the provider by then: ``schedule``), or earlier by the time the
        provider says it held the request after counting it (``processing_s``), release
        the concurrency slot and feed the provider's 429s and rate-limit headers back into
        the pool. Call it as soon as the reply is in: until then the call holds its window
        entries.
        Never raises: a lost settle costs at most one lease and the entries' window
        (the call's deadline plus a grace, plus the window)."""
        if not grant.scopes or grant.deferred:
            return
        delta, block_s, lead_s = 0, 0.0, 0.0
        if completion is not None:
            lead_s = completion.processing_s or 0.0
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
                                block_s, lead_s)
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

