"""What every provider adapter shares: the error taxonomy and the adapter protocol.

Adapters only translate (job body -> HTTP request, HTTP response -> Completion or
ProviderError). What to *do* about an error is policy, decided in one place
(`batchroute.policy`), so OpenAI and Anthropic failures are treated alike.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Protocol

import httpx

from batchroute.completion import Completion


class ErrorKind(StrEnum):
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"  # 5xx, 529
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    CONTEXT_LENGTH = "context_length_exceeded"
    CONTENT_FILTER = "content_filter"
    INVALID_REQUEST = "invalid_request"
    AUTH = "auth"
    BAD_RESPONSE = "bad_response"  # kept for old ledgers; new replies use MALFORMED_REPLY
    MALFORMED_REPLY = "malformed_reply"  # 2xx whose body breaks the API's shape (reply.py)
    REPLY_TOO_LARGE = "reply_too_large"  # body past max_reply_bytes, counted decoded
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the whole call outlived its total deadline


class ProviderError(Exception):
    def __init__(self, kind: ErrorKind, message: str, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{kind.value}: {message}")
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after


class Adapter(Protocol):
    def build_request(self, client: httpx.Client, base_url: str, api_key: str | None,
                      api_model: str, body: dict[str, Any]) -> httpx.Request: ...

    def parse_response(self, response: httpx.Response, latency_s: float) -> Completion: ...


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait, from retry-after-ms, Retry-After or x-ratelimit-reset-* headers."""
    if "retry-after-ms" in headers:
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    if "retry-after" in headers:
        try:
            return float(headers["retry-after"])
        except ValueError:
            pass
    resets = [_duration(headers[h]) for h in ("x-ratelimit-reset-requests",
                                               "x-ratelimit-reset-tokens") if h in headers]
    known = [r for r in resets if r is not None]
    return max(known) if known else None


def _duration(text: str) -> float | None:
    """OpenAI's reset headers look like '1s', '6m0s', '20ms'."""
    total, num, i = 0.0, "", 0
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    while i < len(text):
        c = text[i]
        if c.isdigit() or c == ".":
            num += c
            i += 1
            continue
        unit = "ms" if text[i:i + 2] == "ms" else c
        if unit not in units or not num:
            return None
        total += float(num) * units[unit]
        num, i = "", i + len(unit)
    if num:
        total += float(num)
    return total


def error_from_status(status: int, message: str, code: str = "",
                      retry_after: float | None = None) -> ProviderError:
    """Map an HTTP error status (and the provider's error code) into the taxonomy."""
    code_l = code.lower()
    if "context_length" in code_l or "context length" in message.lower():
        return ProviderError(ErrorKind.CONTEXT_LENGTH, message, status)
    if "content_filter" in code_l or "content_policy" in code_l:
        return ProviderError(ErrorKind.CONTENT_FILTER, message, status)
    if status == 429:
        return ProviderError(ErrorKind.RATE_LIMITED, message, status, retry_after)
    if status in (401, 403):
        return ProviderError(ErrorKind.AUTH, message, status)
    if status >= 500 or status == 408:
        return ProviderError(ErrorKind.OVERLOADED, message, status, retry_after)
    return ProviderError(ErrorKind.INVALID_REQUEST, message, status)
