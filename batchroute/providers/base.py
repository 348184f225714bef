"""What every provider adapter shares: the error taxonomy and the adapter protocol.

Adapters only translate (job body -> HTTP request, HTTP response -> Completion or
ProviderError). What to *do* about an error is policy, decided in one place
(`batchroute.policy`), so OpenAI and Anthropic failures are treated alike.
"""

from __future__ import annotations

import functools
from enum import StrEnum
from typing import Any, Protocol

import httpx

from batchroute.completion import Completion

# Retry-After parsing lives in its own module; these names stay importable from here
# (ratelimit.py reads the reset durations through `_duration`).
from batchroute.providers.retry_after import parse_duration as _duration  # noqa: F401
from batchroute.providers.retry_after import parse_retry_after  # noqa: F401
from batchroute.secrets import redact, redact_obj


@functools.lru_cache(maxsize=256)
def endpoint(base_url: str, path: str) -> httpx.URL:
    """A provider endpoint's URL, parsed once: httpx parses a URL given as text on every
    request (~0.1 ms of each call's CPU). `httpx.URL` is immutable, so one is shared."""
    return httpx.URL(f"{base_url}{path}")


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
        message = redact(message)  # providers echo keys in 401/400 bodies (batchroute.secrets)
        super().__init__(f"{kind.value}: {message}")
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after
        # The provider's HTTP answer when it sent one (status_code, request_id, body), so a
        # failed job's output line can give people what the provider said (OpenAI's format).
        self.response: dict[str, Any] | None = None


class Adapter(Protocol):
    def build_request(self, client: httpx.Client, base_url: str, api_key: str | None,
                      api_model: str, body: dict[str, Any]) -> httpx.Request: ...

    def parse_response(self, response: httpx.Response, latency_s: float) -> Completion: ...


_MAX_ERROR_BODY = 8192


def http_error(error: ProviderError, response: httpx.Response) -> ProviderError:
    """Attach the provider's HTTP answer to ``error``: its status code, its request id
    (``x-request-id``, Anthropic's ``request-id``) and its body (JSON when it is JSON, else
    the first 8 KiB of text), the way OpenAI's batch output reports a failed request."""
    body: Any
    try:
        body = response.json() if len(response.content) <= _MAX_ERROR_BODY else None
    except (ValueError, RecursionError):  # not JSON, or nested deep enough to blow the stack
        body = None
    if body is None:
        body = response.text[:_MAX_ERROR_BODY]
    error.response = {"status_code": response.status_code,
                      "request_id": response.headers.get("x-request-id")
                      or response.headers.get("request-id") or "",
                      "body": redact_obj(body)}  # some providers echo the key back
    return error


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
