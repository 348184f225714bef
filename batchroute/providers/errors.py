"""Classify a provider's error reply (status, headers, body) into the error taxonomy.

Pure (no I/O). Behind gateways the status code alone misleads: LiteLLM's proxy reports a
context-window overflow as a plain HTTP 400 ``litellm.ContextWindowExceededError``, vLLM
and SGLang as a 400 ``BadRequestError`` with their own wording, Anthropic as an
``invalid_request_error`` "prompt is too long", and some gateways (OpenRouter) put an error
object in an HTTP 200 body. Reading them all right matters for batch work: a
context-window error must move the job to a model with a larger window (``CONTEXT_LENGTH``,
never ``INVALID_REQUEST``, which fails the job), and a rate limit or an overload must be
waited out, with the provider's own Retry-After, never counted as a broken request.

The body shapes understood (all JSON; anything else is read as text):

* OpenAI, Azure OpenAI, OpenRouter, LiteLLM's proxy, newer vLLM:
  ``{"error": {"message", "type", "param", "code"}}`` (OpenRouter adds
  ``metadata.raw``, the upstream's own reply; Azure adds ``innererror``);
* Anthropic (and the proxy's ``/v1/messages``): ``{"type": "error", "error": {"type",
  "message"}}``;
* vLLM and SGLang: ``{"object": "error", "message", "type", "code"}``;
* Google's OpenAI-compatible endpoint: a list wrapping the OpenAI shape;
* FastAPI-style ``{"detail": ...}`` and plain text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from batchroute.providers.base import ErrorKind, ProviderError
from batchroute.providers.retry_after import retry_after_in_message, retry_after_seconds

# Wordings of "the prompt does not fit this model's window", lower-cased, by who says it.
CONTEXT_PATTERNS = re.compile("|".join([
    r"context_length_exceeded",  # OpenAI / Azure / OpenRouter code
    r"contextwindowexceedederror",  # LiteLLM's exception class name (proxy 400)
    r"context[ _]window[ _]exceed",  # LiteLLM's mapped message, Z.ai's code
    r"exceeds the context window",  # OpenAI, Responses-era wording
    r"maximum context length",  # OpenAI, vLLM, OpenRouter, Mistral
    r"longer than the model's context length",  # vLLM / SGLang / Together
    r"maximum prompt length is",  # xAI
    r"context length exceeded",
    r"prompt is too long",  # Anthropic
    r"input is too long",  # Bedrock
    r"exceeds the maximum number of tokens allowed",  # Gemini
    r"`inputs` tokens \+ `max_new_tokens` must be",  # TGI / Together
    r"reduce the length of the messages",  # OpenAI's suggestion with the same error
    r"too many tokens in (?:the )?prompt",
]))
CONTENT_FILTER_PATTERNS = re.compile("|".join([
    r"content_filter", r"content_policy", r"contentpolicyviolationerror",
    r"responsibleaipolicyviolation", r"content management policy",
]))
# What is kept of a provider's words: enough to read, bounded against a hostile upstream.
MAX_MESSAGE = 1000
MAX_CODE = 100
RATE_LIMIT_TYPES = {"rate_limit_error", "rate_limit_exceeded", "throttling_error",
                    "ratelimiterror", "resource_exhausted", "tokens", "requests"}
OVERLOAD_TYPES = {"overloaded_error", "api_error", "server_error", "service_unavailable",
                  "internalservererror", "serviceunavailableerror", "unavailable"}
AUTH_TYPES = {"authentication_error", "permission_error", "invalid_api_key",
              "permission_denied", "unauthenticated", "authenticationerror"}


def error_fields(body: Any, fallback: str = "") -> tuple[str, str, str]:
    """(message, type, code) of any known error body; ``body`` is parsed JSON or text."""
    if isinstance(body, list) and body:
        body = body[0]
    if not isinstance(body, dict):
        text = str(body)[:MAX_MESSAGE] if body not in (None, "") else ""
        return (f"{fallback}: {text}" if text and fallback else text or fallback), "", ""
    err: Any = body.get("error", body)
    if isinstance(err, str):  # {"error": "message"} (older gateways, Ollama)
        return (err[:MAX_MESSAGE], str(body.get("type") or "")[:MAX_CODE],
                str(body.get("code") or "")[:MAX_CODE])
    if not isinstance(err, dict):
        err = body
    message = err.get("message") or err.get("detail") or body.get("detail") or fallback
    if not isinstance(message, str):
        message = json.dumps(message)[:MAX_MESSAGE]
    meta = err.get("metadata")
    if isinstance(meta, dict) and meta.get("raw"):  # OpenRouter: the upstream's own reply
        raw = meta["raw"]
        message = f"{message} (upstream: {raw if isinstance(raw, str) else json.dumps(raw)})"
    inner = err.get("innererror")
    code = err.get("code")
    if isinstance(inner, dict) and inner.get("code") and not code:
        code = inner["code"]
    return (message[:MAX_MESSAGE], str(err.get("type") or err.get("status") or "")[:MAX_CODE],
            str(code or "")[:MAX_CODE])


def _parse(body: bytes | str | Any) -> Any:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        try:
            return json.loads(body)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
            return body.strip()
    return body


def classify(status: int, headers: Mapping[str, str], body: bytes | str | Any,
             cap_s: float | None = None) -> ProviderError:
    """The ProviderError for an error reply (any status, including a 200 carrying an error).

    ``cap_s`` bounds the Retry-After read from the headers (the job's remaining deadline).
    """
    message, etype, code = error_fields(_parse(body), fallback=f"HTTP {status}")
    text = f"{message} {etype} {code}".lower()
    etype_l, code_l = etype.lower(), code.lower()
    if status < 400 and code.isdigit() and 400 <= int(code) < 600:
        status = int(code)  # OpenRouter's 200-with-error carries the real status as code
    if status != 429 and ("context_length" in code_l or CONTEXT_PATTERNS.search(text)):
        return ProviderError(ErrorKind.CONTEXT_LENGTH, message, status)
    if CONTENT_FILTER_PATTERNS.search(f"{etype_l} {code_l}") or (
            status == 400 and CONTENT_FILTER_PATTERNS.search(text)):
        return ProviderError(ErrorKind.CONTENT_FILTER, message, status)
    kind = _kind(status, etype_l, code_l, text)
    retry_after = None
    if kind in (ErrorKind.RATE_LIMITED, ErrorKind.OVERLOADED):
        retry_after = retry_after_seconds(headers, cap_s=cap_s)
        if retry_after is None:
            retry_after = retry_after_in_message(message, cap_s=cap_s)
    return ProviderError(kind, message, status, retry_after)


def _kind(status: int, etype: str, code: str, text: str) -> ErrorKind:
    if status == 429 or etype in RATE_LIMIT_TYPES or code in ("rate_limit_exceeded", "429"):
        return ErrorKind.RATE_LIMITED
    if status in (401, 403) or etype in AUTH_TYPES or code in AUTH_TYPES:
        return ErrorKind.AUTH
    # 408 and 409 (a lock timeout at OpenAI) are retried by the providers' own SDKs too.
    if etype in OVERLOAD_TYPES or status >= 500 or status in (408, 409):
        return ErrorKind.OVERLOADED
    if status < 400:
        # An error object in a 2xx body with nothing saying what it is: the gateway or
        # its upstream failed mid-way; retry like any unreadable reply.
        return ErrorKind.BAD_RESPONSE
    if "litellm.ratelimiterror" in text:
        return ErrorKind.RATE_LIMITED
    return ErrorKind.INVALID_REQUEST


def reply_error(status: int, headers: Mapping[str, str], content: bytes,
                cap_s: float | None = None) -> ProviderError | None:
    """The error a reply carries, or None for a reply to parse as a completion.

    Any status >= 400 is an error; a 2xx is one when its body is an error object (some
    gateways answer 200 with ``{"error": ...}``). A 2xx body without the bytes ``"error"``
    is no error object, so successful replies are not parsed twice.
    """
    if status >= 400:
        return classify(status, headers, content, cap_s)
    if b'"error"' not in content:
        return None
    return error_in_ok_reply(status, headers, content, cap_s)


def error_in_ok_reply(status: int, headers: Mapping[str, str], body: bytes | str | Any,
                      cap_s: float | None = None) -> ProviderError | None:
    """The error a 2xx reply carries instead of a completion, or None when it does not."""
    data = _parse(body)
    return classify(status, headers, data, cap_s) if error_in_ok_body(data) else None


def error_in_ok_body(data: Any) -> bool:
    """Whether a 2xx JSON body is an error object rather than a reply (gateways such as
    OpenRouter answer 200 with ``{"error": {...}}`` when the upstream failed mid-way)."""
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    if not isinstance(data, dict):
        return False
    if data.get("type") == "error" or data.get("object") == "error":
        return True
    return bool(data.get("error")) and "choices" not in data and "content" not in data
