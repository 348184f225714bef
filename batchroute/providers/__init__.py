"""Provider adapters over httpx, and the one call site that uses them."""

from __future__ import annotations

import time
from typing import Any

import httpx

from batchroute import secrets
from batchroute.completion import Completion
from batchroute.config import ProviderConfig
from batchroute.providers.anthropic import AnthropicAdapter
from batchroute.providers.base import Adapter, ErrorKind, ProviderError
from batchroute.providers.body import BadEncoding, ReplyTooLarge, keep, read_capped
from batchroute.providers.deadline import WATCHDOG
from batchroute.providers.openai import OpenAIAdapter

ADAPTERS: dict[str, Adapter] = {"openai": OpenAIAdapter(), "anthropic": AnthropicAdapter()}

__all__ = ["ADAPTERS", "Adapter", "ErrorKind", "ProviderError", "call"]


def call(client: httpx.Client, provider: ProviderConfig, base_url: str, api_model: str,
         body: dict[str, Any]) -> Completion:
    """One HTTP call to a provider, normalised; raises ProviderError for every failure."""
    adapter = ADAPTERS[provider.kind]
    api_key = secrets.api_key(provider.api_key_env)  # stripped, registered for redaction
    request = adapter.build_request(client, base_url, api_key, api_model, body)
    request.extensions["timeout"] = httpx.Timeout(provider.timeout_s).as_dict()
    # Each read is bounded by timeout_s; the whole call by deadline_s (a trickled body).
    guard = WATCHDOG.arm(provider.deadline_s)
    request.extensions["trace"] = guard.trace
    started = time.perf_counter()
    try:
        response = client.send(request, stream=True)
        try:
            guard.watch(response.extensions.get("network_stream"))
            content = read_capped(response, provider.max_reply_bytes)
            if guard.fired:  # a cut socket can look like the end of a close-delimited body
                raise httpx.ReadError("cut by the total deadline")
        finally:
            response.close()
    except ReplyTooLarge as e:
        raise ProviderError(ErrorKind.REPLY_TOO_LARGE, str(e), response.status_code) from None
    except BadEncoding as e:
        raise ProviderError(ErrorKind.MALFORMED_REPLY, str(e), response.status_code) from None
    except (httpx.TransportError, httpx.StreamError) as e:
        if guard.fired:
            raise ProviderError(ErrorKind.DEADLINE_EXCEEDED,
                                f"call not done within its total deadline of "
                                f"{provider.deadline_s:g}s") from None
        if isinstance(e, httpx.TimeoutException):
            raise ProviderError(ErrorKind.TIMEOUT, f"no answer within {provider.timeout_s}s "
                                f"({type(e).__name__})") from None
        raise ProviderError(ErrorKind.CONNECTION, f"{type(e).__name__}: {e}") from None
    finally:
        guard.disarm()
    try:
        return adapter.parse_response(keep(response, content), time.perf_counter() - started)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError,
            OverflowError) as e:
        # The reply checks (providers/reply.py) should have named the fault; whatever they
        # missed still ends this attempt with its cause recorded, never crashes the run.
        raise ProviderError(ErrorKind.MALFORMED_REPLY, f"unreadable reply ({type(e).__name__}: "
                            f"{str(e)[:200]})", response.status_code) from None
