"""Provider batch decisions, pure: which calls go to a batch API, when waiting jobs form a
provider batch, and where a job goes whose provider batch did not answer it.

Kept apart from the runner (I/O) so each rule tests without a server or a database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from batchroute.provider_batch.formats import LIMITS


class WaitingJob(Protocol):
    """What the grouping reads of a waiting job (`store.provider_batches.Waiting`)."""

    @property
    def batch_id(self) -> str: ...
    @property
    def provider(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def since(self) -> datetime: ...


def wants_batch_api(model_uses_batch: bool, batch_flag: bool | None, options: dict[str, Any],
                    now: float, deadline: float) -> bool:
    """Whether this call goes into a provider batch instead of out at once.

    The pool must be marked ``batch = true``; the batch must not have said
    ``--no-provider-batch``; the job must not have been sent synchronous (its provider batch
    expired too often, or the deadline came: ``options["sync"]``); and the batch's deadline
    must still be ahead: past it, waiting stops and what is left runs synchronously."""
    if not model_uses_batch or batch_flag is False or options.get("sync"):
        return False
    return now < deadline


@dataclass(frozen=True)
class Limits:
    """How big one provider batch may be: requests and tokens (bytes are checked when the
    file is built, from the bodies)."""

    max_requests: int
    max_tokens: int | None = None

    @classmethod
    def of(cls, api: str, max_requests: int | None, max_tokens: int | None) -> Limits:
        api_max = LIMITS[api][0]
        return cls(min(api_max, max_requests) if max_requests else api_max, max_tokens)


def ready_groups(jobs: Sequence[WaitingJob], now: datetime, gather_s: float,
                 busy: set[str], limits: dict[str, Limits]) -> list[list[WaitingJob]]:
    """Waiting jobs that should go out now, as provider batches.

    Jobs are grouped by (batch, provider, model): one model per OpenAI input file, and one
    user batch per provider batch so that cancelling or a deadline touches no other
    batch. A group goes out when it fills a provider batch, when its oldest job has
    waited `gather_s`, or when its batch has nothing else running (no more jobs are coming
    soon: waiting longer would only add latency). A full group is cut into as many
    provider batches as its limits need; `limits` is keyed by provider."""
    groups: dict[tuple[str, str, str], list[WaitingJob]] = {}
    for job in jobs:
        groups.setdefault((job.batch_id, job.provider, job.model), []).append(job)
    out: list[list[WaitingJob]] = []
    for (batch_id, provider, _model), members in groups.items():
        limit = limits[provider]
        chunks = _cut(members, limit)
        oldest = min(j.since for j in members)
        due = (now - oldest >= timedelta(seconds=gather_s)) or batch_id not in busy
        for chunk in chunks:
            full = len(chunk) >= limit.max_requests or (
                limit.max_tokens is not None and chunk is not chunks[-1])
            if due or full:
                out.append(chunk)
    return out


def _cut(jobs: list[WaitingJob], limit: Limits) -> list[list[WaitingJob]]:
    chunks: list[list[WaitingJob]] = [[]]
    tokens = 0
    for job in jobs:
        over_tokens = (limit.max_tokens is not None and chunks[-1]
                       and tokens + job.prompt_tokens > limit.max_tokens)
        if len(chunks[-1]) >= limit.max_requests or over_tokens:
            chunks.append([])
            tokens = 0
        chunks[-1].append(job)
        tokens += job.prompt_tokens
    return [c for c in chunks if c]


#: What became of a request its provider batch did not answer.
REGATHER, SYNC = "regather", "sync"


def after_unanswered(expiries: int, max_expiries: int, now: float, deadline: float) -> str:
    """A request whose provider batch expired or was cancelled by the provider (never
    executed, never billed): into the next provider batch while the deadline is ahead and
    it has not expired `max_expiries` times, else synchronously (the user's deadline is
    what bounds waiting; a job never fails for a provider's expiry)."""
    if expiries < max_expiries and now < deadline:
        return REGATHER
    return SYNC
