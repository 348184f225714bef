"""`[provider_batch]`: how jobs are gathered into provider batches and how often they are polled.

Which pools use a provider's batch API is said where the pool is (``providers.<p>.batch``
or ``models.<m>.batch``); this table holds what is the same for all of them. The defaults
suit real providers, whose batches take minutes to hours: gathering for a minute costs
nothing against a 24 h window, and polling each batch once a minute is far below any
API's rate limit. Tests shorten both.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


class ProviderBatchConfigError(ValueError):
    """A bad ``[provider_batch]`` value; the message names the key."""


@dataclass(frozen=True)
class ProviderBatchConfig:
    # A pool's waiting jobs go out as one provider batch once the oldest has waited this
    # long, once they fill a batch, or once nothing else of their batch is still running.
    gather_s: float = 60.0
    # How often a submitted provider batch is polled.
    poll_s: float = 60.0
    # At most this many requests per provider batch (None: the API's own limit).
    max_requests: int | None = None
    # At most this many prompt tokens (the ingest's estimate) per provider batch, to stay
    # under a provider's "enqueued tokens" limit (None: no limit of ours).
    max_tokens: int | None = None
    # A provider batch whose create call was sent but whose id was never stored (the
    # submitter died) is looked up at the provider after this long, then sent again only
    # if the provider has no such batch.
    submit_timeout_s: float = 120.0
    # How long one worker may hold a provider batch while submitting or collecting it.
    lease_s: float = 300.0
    # A job whose provider batch expired is sent in a new provider batch this many times,
    # then synchronously.
    max_expiries: int = 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProviderBatchConfig:
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in d.items():
            where = f"provider_batch.{key}"
            if key not in known:
                raise ProviderBatchConfigError(f"{where}: unknown key (known: "
                                               f"{', '.join(sorted(known))})")
            integer = key in ("max_requests", "max_tokens", "max_expiries")
            ok_type = int if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, ok_type):
                raise ProviderBatchConfigError(
                    f"{where}: expected {'an integer' if integer else 'a number'}, "
                    f"got {value!r}")
            if value < 0 or (value == 0 and key != "max_expiries"):
                raise ProviderBatchConfigError(f"{where}: must be > 0, got {value!r}")
            values[key] = value if integer else float(value)
        return cls(**values)
