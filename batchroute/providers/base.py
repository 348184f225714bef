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
from batchroute.secrets import redact

# Retry-After parsing lives in its own module; these names stay importable from here
# (ratelimit.py reads the reset durations through `_duration`).
from batchroute.providers.retry_after import parse_duration as _duration  # noqa: F401
from batchroute.providers.retry_after import parse_retry_after  # noqa: F401


class ErrorKind(StrEnum):
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"  # 5xx, 529
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    CONTEXT_LENGTH = "context_length_exceeded"
    CONTENT_FILTER = "content_filter"
    INVALID_REQUEST = "invalid_request"
    AUTH = "auth"
    BAD_RESPONSE = "bad_response"  # 200 with a body we cannot read


class ProviderError(Exception):
    def __init__(self, kind: ErrorKind, message: str, status: int | None = None,
                 retry_after: float | None = None) -> None:
        message = redact(message)  # providers echo keys in 401/400 bodies (batchroute.secrets)
        super().__init__(f"{kind.value}: {message}")
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after


class Adapter(Protocol):
    def build_request(self, client: httpx.Client, base_url: str, api_key: str | None,
                      api_model: str, body: dict[str, Any]) -> httpx.Request: ...

    def parse_response(self, response: httpx.Response, latency_s: float) -> Completion: ...


def error_from_status(status: int, message: str, code: str = "",
                      retry_after: float | None = None) -> ProviderError:
    """Map an HTTP error status (and the provider's error code) into the taxonomy.

    The adapters classify whole replies with `batchroute.providers.errors.classify`, which
    also knows the gateways' wordings; this status-first mapping stays for callers that
    only have a status and a code."""
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
