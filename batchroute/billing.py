"""What one answered call is billed: the provider's usage when it is believable, our own
count when it is not, and a cost that is never negative nor far above the reservation.

Why: the usage a reply reports comes from outside. Negative counts became negative
costs (and a negative cost let a batch spend 2.5x its budget), 2^40 tokens became a
multi-million-dollar attempt, and a count past 2^31 failed the PostgreSQL write. The
rules, pure apart from tiktoken:

- a count that is not a sane integer was already zeroed and flagged `usage_suspect`
  by the adapter (batchroute.providers.reply.token_count);
- a sane integer that no request like this one can produce (over PLAUSIBLE_FACTOR x the
  prompt estimate / the completion limit, plus slack for framing and images) is
  flagged `usage_suspect` too;
- a suspect reply is billed on tiktoken's count of the prompt (the ingest estimate)
  and of the answer's text;
- the cost is clamped into [0, COST_CLAMP_FACTOR x the call's reserved maximum] and
  flagged `cost_clamped` when it had to be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batchroute import pricing
from batchroute.completion import Completion, Usage
from batchroute.config import ModelConfig
from batchroute.tokens import count_text

PLAUSIBLE_FACTOR = 10
# Tokens a prompt may cost beyond our text estimate: chat framing, tool definitions and
# images (which the estimate does not count; a high-detail image is ~1-2k tokens).
PROMPT_SLACK = 20_000
COMPLETION_SLACK = 1_000
# A billed cost above this multiple of the call's reserved maximum is clamped to it.
COST_CLAMP_FACTOR = 2.0

USAGE_SUSPECT = "usage_suspect"
COST_CLAMPED = "cost_clamped"


@dataclass(frozen=True)
class Bill:
    usage: Usage
    cost_usd: float
    flags: tuple[str, ...] = ()

    @property
    def flags_text(self) -> str | None:
        """The Attempt.flags column: comma-separated, None when nothing was doubtful."""
        return ",".join(self.flags) or None


def plausible(usage: Usage, prompt_est: int, max_out: int) -> bool:
    """Could a request with this prompt estimate and completion limit report this usage?"""
    return (usage.prompt_tokens <= PLAUSIBLE_FACTOR * max(prompt_est, 1) + PROMPT_SLACK
            and usage.completion_tokens <= PLAUSIBLE_FACTOR * max(max_out, 1)
            + COMPLETION_SLACK
            and usage.cached_tokens <= usage.prompt_tokens)


def own_count(completion: Completion, prompt_est: int) -> Usage:
    """tiktoken's count: the ingest's prompt estimate, and every returned choice's text."""
    texts = (completion.content, *completion.alternatives)
    return Usage(prompt_tokens=max(0, prompt_est),
                 completion_tokens=sum(count_text(t) for t in texts if t))


def clamp_cost(cost: float, reserved_max: float) -> tuple[float, bool]:
    """(cost within [0, COST_CLAMP_FACTOR x reserved_max], whether it had to move)."""
    ceiling = COST_CLAMP_FACTOR * max(0.0, reserved_max)
    if math.isnan(cost) or cost < 0:
        return 0.0, True
    if cost > ceiling:
        return ceiling, True
    return cost, False


def bill(model: ModelConfig, completion: Completion, prompt_est: int, max_out: int,
         reserved_max: float) -> Bill:
    """The usage and cost to record for an answered call, with what was doubtful.
    `max_out` is the most completion tokens the call may return (max_tokens x n)."""
    flags: list[str] = [f for f in completion.flags if f == USAGE_SUSPECT]
    usage = completion.usage
    if not flags and not plausible(usage, prompt_est, max_out):
        flags.append(USAGE_SUSPECT)
    if flags:
        usage = own_count(completion, prompt_est)
    cost, clamped = clamp_cost(pricing.model_cost(model, usage), reserved_max)
    if clamped:
        flags.append(COST_CLAMPED)
    return Bill(usage, cost, tuple(flags))
