"""Anthropic's Messages API, spoken natively, translated to and from the OpenAI shape.

Jobs arrive OpenAI-shaped and results leave as `chat.completion` bodies, so the
output file looks the same whichever provider answered.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from batchroute.completion import Completion, Usage
from batchroute.providers.base import ErrorKind, ProviderError, endpoint, http_error
from batchroute.providers.errors import reply_error
from batchroute.providers.reply import (
    MalformedReply,
    check_messages_reply,
    decode_json,
    field_str,
    token_count,
)
from batchroute.tokens import DEFAULT_MAX_COMPLETION, message_text

API_VERSION = "2023-06-01"
STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                "tool_use": "tool_calls", "refusal": "content_filter", "pause_turn": "stop"}


def to_messages_request(api_model: str, body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI chat body -> Messages API body (system prompt lifted out, max_tokens required)."""
    system = [message_text(m.get("content")) for m in body["messages"]
              if m.get("role") in ("system", "developer")]
    messages = [{"role": m["role"], "content": m.get("content") or ""}
                for m in body["messages"] if m.get("role") in ("user", "assistant")]
    payload: dict[str, Any] = {
        "model": api_model, "messages": messages,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens")
        or DEFAULT_MAX_COMPLETION,
    }
    if system:
        payload["system"] = "\n\n".join(system)
    for key in ("temperature", "top_p"):
        if key in body:
            payload[key] = body[key]
    if body.get("stop"):
        stop = body["stop"]
        payload["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    return payload


def to_chat_completion(data: dict[str, Any], finish_reason: str, content: str) -> dict[str, Any]:
    usage = data.get("usage") or {}
    # A count that is not sane is 0 here; the pipeline bills such a reply on its own count.
    prompt = ((token_count(usage.get("input_tokens")) or 0)
              + (token_count(usage.get("cache_read_input_tokens")) or 0))
    completion = token_count(usage.get("output_tokens")) or 0
    return {
        "id": field_str(data.get("id")), "object": "chat.completion",
        "created": int(time.time()), "model": field_str(data.get("model")),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
    }


class AnthropicAdapter:
    def build_request(self, client: httpx.Client, base_url: str, api_key: str | None,
                      api_model: str, body: dict[str, Any]) -> httpx.Request:
        headers = {"anthropic-version": API_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return client.build_request("POST", endpoint(base_url, "/messages"),
                                    json=to_messages_request(api_model, body), headers=headers)

    def parse_response(self, response: httpx.Response, latency_s: float) -> Completion:
        error = reply_error(response.status_code, response.headers, response.content)
        if error is not None:  # any status >= 400, or a gateway's error object in a 200
            raise http_error(error, response)
        try:
            data = decode_json(response.content)
            check_messages_reply(data)
        except MalformedReply as e:
            raise ProviderError(ErrorKind.MALFORMED_REPLY, f"Messages API reply: {e}",
                                response.status_code) from None
        content = "".join(block["text"] for block in data["content"]
                          if block.get("type") == "text")
        usage = data.get("usage") or {}
        counts = [token_count(usage.get(k), required=k != "cache_read_input_tokens")
                  for k in ("input_tokens", "output_tokens", "cache_read_input_tokens")]
        flags = ("usage_suspect",) if None in counts else ()
        prompt_in, output, cached = (c or 0 for c in counts)
        finish = STOP_REASONS.get(str(data.get("stop_reason")), "stop")
        return Completion(
            content=content, finish_reason=finish,
            usage=Usage(prompt_tokens=prompt_in + cached, completion_tokens=output,
                        cached_tokens=cached),
            model=field_str(data.get("model")),
            request_id=response.headers.get("request-id", "") or field_str(data.get("id")),
            latency_s=latency_s, body=to_chat_completion(data, finish, content),
            rate_limit={k: v for k, v in response.headers.items() if "ratelimit" in k},
            flags=flags,
        )

