"""Provider adapters over httpx, and the one call site that uses them."""

from __future__ import annotations

import os
import time
from typing import Any

import httpx

from batchroute.completion import Completion
from batchroute.config import ProviderConfig
from batchroute.providers.anthropic import AnthropicAdapter
from batchroute.providers.base import Adapter, ErrorKind, ProviderError
from batchroute.providers.errors import error_in_ok_reply
from batchroute.providers.openai import OpenAIAdapter

ADAPTERS: dict[str, Adapter] = {"openai": OpenAIAdapter(), "anthropic": AnthropicAdapter()}

__all__ = ["ADAPTERS", "Adapter", "ErrorKind", "ProviderError", "call"]


def call(client: httpx.Client, provider: ProviderConfig, base_url: str, api_model: str,
         body: dict[str, Any]) -> Completion:
    """One HTTP call to a provider, normalised; raises ProviderError for every failure."""
    adapter = ADAPTERS[provider.kind]
    api_key = os.environ.get(provider.api_key_env) if provider.api_key_env else None
    request = adapter.build_request(client, base_url, api_key, api_model, body)
    request.extensions["timeout"] = httpx.Timeout(provider.timeout_s).as_dict()
    started = time.perf_counter()
    try:
        response = client.send(request)
    except httpx.TimeoutException as e:
        raise ProviderError(ErrorKind.TIMEOUT, f"no answer within {provider.timeout_s}s "
                            f"({type(e).__name__})") from None
    except httpx.TransportError as e:
        raise ProviderError(ErrorKind.CONNECTION, f"{type(e).__name__}: {e}") from None
    try:
        return adapter.parse_response(response, time.perf_counter() - started)
    except ProviderError as e:
        # Some gateways answer 200 with an error object (a rate limit, an upstream's
        # overload): read it as that error rather than as an unreadable reply.
        if e.kind is ErrorKind.BAD_RESPONSE and response.status_code < 400:
            raise error_in_ok_reply(response.status_code, response.headers,
                                    response.content) or e from None
        raise
