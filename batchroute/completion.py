"""The one shape every provider adapter returns, whatever API it spoke.

Keeping this separate from the adapters lets validators, the ledger and the
output writer depend on a tiny, stable type instead of on httpx or a provider.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Usage:
    """Token usage as the provider reported it (what gets billed)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Completion:
    """A normalised chat completion.

    `body` is an OpenAI ``chat.completion`` object, whatever the provider spoke,
    because that is what the output file promises users.
    """

    content: str
    finish_reason: str
    usage: Usage
    model: str
    request_id: str = ""
    latency_s: float = 0.0
    logprobs: list[float] | None = None
    body: dict[str, Any] = field(default_factory=dict)
    rate_limit: dict[str, str] = field(default_factory=dict)
    processing_s: float | None = None
    """How long before the reply the provider counted the request, when it says
    (``openai-processing-ms``): the rate-limit pools date the call that much earlier."""
    alternatives: tuple[str, ...] = ()
    """Contents of the other choices (index 1..n-1) when the request asked for ``n`` > 1:
    the samples a `consensus` check compares with `content`."""
    flags: tuple[str, ...] = ()
    """What the reply checks found doubtful but not fatal (``usage_suspect``: a token count
    that is not a sane integer; the pipeline bills on its own count then)."""
