"""What the provider tells the pools: the tokens it really counted, and rate-limit headers
saying a limit is exhausted until some reset."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from batchroute.completion import Usage
from batchroute.providers.base import _duration as parse_duration
from batchroute.ratelimit.schedule import MAX_BLOCK_S


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

