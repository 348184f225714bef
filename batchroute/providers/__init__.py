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
    started = time.perf_counter()
    try:
        response = client.send(request)
    except httpx.TimeoutException as e:
        raise ProviderError(ErrorKind.TIMEOUT, f"no answer within {provider.timeout_s}s "
                            f"({type(e).__name__})") from None
    except httpx.TransportError as e:
        raise ProviderError(ErrorKind.CONNECTION, f"{type(e).__name__}: {e}") from None
    return adapter.parse_response(response, time.perf_counter() - started)
