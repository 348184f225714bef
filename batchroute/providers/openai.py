"""OpenAI-compatible chat completions: OpenAI, Azure-style URLs, DeepSeek, Mistral,
Together, Groq, OpenRouter, vLLM, Ollama and the built-in simulator."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import httpx

from batchroute.completion import Completion, Usage
from batchroute.providers.base import ErrorKind, ProviderError, endpoint, http_error
from batchroute.providers.errors import reply_error
from batchroute.providers.reply import (
    MalformedReply,
    check_chat_completion,
    decode_json,
    field_str,
    token_count,
)

# Keys of the job body forwarded to the provider; anything else (our own fields,
# vendor extensions a provider would reject) stays behind.
FORWARDED = ("messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
             "response_format", "seed", "logprobs", "top_logprobs", "presence_penalty",
             "frequency_penalty", "tools", "tool_choice", "n", "user")


class OpenAIAdapter:
    def build_request(self, client: httpx.Client, base_url: str, api_key: str | None,
                      api_model: str, body: dict[str, Any]) -> httpx.Request:
        payload = {k: body[k] for k in FORWARDED if k in body}
        payload["model"] = api_model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return client.build_request("POST", endpoint(base_url, "/chat/completions"), json=payload,
                                    headers=headers)

    def parse_response(self, response: httpx.Response, latency_s: float) -> Completion:
        error = reply_error(response.status_code, response.headers, response.content)
        if error is not None:  # any status >= 400, or a gateway's error object in a 200
            raise http_error(error, response)
        try:
            data = decode_json(response.content)
            check_chat_completion(data)
        except MalformedReply as e:
            raise ProviderError(ErrorKind.MALFORMED_REPLY, f"chat.completion: {e}",
                                response.status_code) from None
        choice = data["choices"][0]
        msg = choice["message"]
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        counts = [token_count(usage.get(k), required=True)
                  for k in ("prompt_tokens", "completion_tokens")]
        cached = token_count(details.get("cached_tokens"))
        flags = ("usage_suspect",) if None in counts or cached is None else ()
        lp = choice.get("logprobs")
        logprobs = None
        if isinstance(lp, dict) and isinstance(lp.get("content"), list):
            logprobs = [float(t.get("logprob", 0.0)) for t in lp["content"]]
        return Completion(
            content=msg.get("content") or "",
            finish_reason=choice.get("finish_reason") or "stop",
            usage=Usage(prompt_tokens=counts[0] or 0, completion_tokens=counts[1] or 0,
                        cached_tokens=cached or 0),
            model=field_str(data.get("model")),
            request_id=response.headers.get("x-request-id", "") or field_str(data.get("id")),
            latency_s=latency_s,
            logprobs=logprobs,
            body=data,
            rate_limit={k: v for k, v in response.headers.items() if "ratelimit" in k},
            processing_s=processing_seconds(response.headers, latency_s),
            alternatives=_other_choices(data["choices"]),
            flags=flags,
        )


def processing_seconds(headers: Mapping[str, str], latency_s: float) -> float | None:
    """How long the provider held the request after counting it (``openai-processing-ms``,
    also behind LiteLLM's proxy as ``llm_provider-openai-processing-ms``). A provider's
    limiter counts a request before processing it, so the request was counted at least
    this long before our reply arrived: the pools date the call that much earlier. A
    value that is not a finite number is ignored, and none may exceed the call's own
    latency (a provider cannot have held it longer than we waited)."""
    for name in ("openai-processing-ms", "llm_provider-openai-processing-ms"):
        text = headers.get(name)
        if text is None:
            continue
        try:
            ms = float(text)
        except ValueError:
            return None
        if not math.isfinite(ms) or ms < 0:
            return None
        return min(ms / 1000, max(0.0, latency_s))
    return None


def _other_choices(choices: list[Any]) -> tuple[str, ...]:
    """Contents of choices 1..n-1 (a request with ``n`` > 1), in index order."""
    if len(choices) < 2:
        return ()
    ordered = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
    return tuple(str(((c.get("message") or {}) if isinstance(c, dict) else {}).get("content")
                     or "") for c in ordered[1:])

