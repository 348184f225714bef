"""Wire formats: OpenAI chat-completions and Anthropic messages, requests and replies.

Both speak to the same engine; only parsing, error shapes and header names differ. The
shapes follow the real APIs closely (error bodies, rate-limit headers, Retry-After),
because the point of the sim is to exercise the production adapters unchanged.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from batchroute.sim.engine import ChatRequest, Failure, Outcome, Success
from batchroute.sim.limits import Decision, LimitStatus
from batchroute.sim.tokens import message_text


class ApiError(Exception):
    """A request the API itself rejects (auth, validation), rendered in the caller's shape."""

    def __init__(self, status: int, kind: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.param = param


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    return Reply(status, body, {"content-type": "application/json", **(headers or {})})


def answer_reply(payload: Any, headers: dict[str, str], malformed: bool) -> Reply:
    """A 200 answer; a "malformed" fault cuts the body in half, as a dropped connection
    behind a proxy would, so the client meets JSON it cannot parse."""
    reply = json_reply(200, payload, headers)
    if malformed:
        reply.body = reply.body[: len(reply.body) // 2]
    return reply


def _seconds(value: float) -> str:
    """Retry-After in seconds with at most millisecond precision, never rounded down, so a
    client that waits exactly this long is admitted by the strict limiter."""
    ms = math.ceil(round(value * 1000, 6))
    return str(ms // 1000) if ms % 1000 == 0 else f"{ms / 1000:.3f}".rstrip("0")


def _duration(value: float) -> str:
    """OpenAI's reset-header style: "250ms", "1.5s", "1m0s"."""
    if value < 1:
        return f"{math.ceil(value * 1000)}ms"
    if value < 60:
        return f"{math.ceil(value * 1000) / 1000:g}s"
    minutes, seconds = divmod(math.ceil(value), 60)
    return f"{minutes}m{seconds}s"


def _retry_headers(retry_after_s: float | None) -> dict[str, str]:
    if retry_after_s is None:
        return {}
    return {
        "retry-after": _seconds(retry_after_s),
        "retry-after-ms": str(math.ceil(round(retry_after_s * 1000, 6))),
    }


def _check_messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "invalid_request", "'messages' must be a non-empty array",
                       "messages")
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, "invalid_request",
                           f"messages[{i}] must be an object with a string 'role'",
                           f"messages[{i}]")
    return raw


def _check_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "invalid_request", "you must provide a model parameter", "model")
    return model


def _check_max_tokens(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, "invalid_request", f"'{name}' must be a positive integer", name)
    return value


def _stops(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise ApiError(400, "invalid_request", f"'{name}' must be a string or array of strings",
                   name)


def _check_n(value: Any) -> int:
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 128:
        raise ApiError(400, "invalid_request", "'n' must be an integer between 1 and 128", "n")
    return value


def _request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


# --- OpenAI ----------------------------------------------------------------------------

_OPENAI_TYPES = {
    "invalid_request": ("invalid_request_error", None),
    "context_length": ("invalid_request_error", "context_length_exceeded"),
    "authentication": ("invalid_request_error", "invalid_api_key"),
    "not_found": ("invalid_request_error", "unknown_url"),
    "method": ("invalid_request_error", "method_not_allowed"),
    "server_error": ("server_error", "server_error"),
    "overloaded": ("server_error", "overloaded"),
    "injected": ("api_error", None),
    "replay_miss": ("invalid_request_error", "replay_miss"),
}


class OpenAIProtocol:
    name = "openai"

    def check_auth(self, headers: dict[str, str]) -> None:
        if headers.get("authorization", "").strip() == "Bearer invalid":
            raise ApiError(401, "authentication",
                           "Incorrect API key provided: invalid (simulated).")

    def parse(self, body: dict[str, Any], headers: dict[str, str]) -> ChatRequest:
        model = _check_model(body)
        messages = _check_messages(body.get("messages"))
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        response_format = body.get("response_format")
        if response_format is not None and not isinstance(response_format, dict):
            raise ApiError(400, "invalid_request", "'response_format' must be an object",
                           "response_format")
        return ChatRequest(
            model=model,
            messages=[{"role": m["role"], "content": message_text(m.get("content"))}
                      for m in messages],
            response_format=response_format,
            max_tokens=_check_max_tokens(body.get(name), name),
            logprobs=bool(body.get("logprobs")),
            stop=_stops(body.get("stop"), "stop"),
            n=_check_n(body.get("n")),
        )

    def error(self, status: int, kind: str, message: str, param: str | None = None,
              limit_type: str | None = None, retry_after_s: float | None = None,
              limits: Decision | None = None) -> Reply:
        typ: str
        code: str | None
        if kind == "rate_limit":
            typ, code = (limit_type or "requests"), "rate_limit_exceeded"
        else:
            typ, code = _OPENAI_TYPES.get(kind, ("api_error", None))
        payload = {"error": {"message": message, "type": typ, "param": param, "code": code}}
        headers = {"x-request-id": _request_id(), **_retry_headers(retry_after_s),
                   **self._limit_headers(limits)}
        return json_reply(status, payload, headers)

    def render(self, outcome: Outcome, req: ChatRequest) -> Reply:
        if isinstance(outcome, Failure):
            return self.error(outcome.status, outcome.kind, outcome.message,
                              limit_type=outcome.limit_type, retry_after_s=outcome.retry_after_s,
                              limits=outcome.limits)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": outcome.content, "refusal": None},
            "logprobs": None,
            "finish_reason": "stop" if outcome.finish_reason == "stop_sequence"
            else outcome.finish_reason,
        }
        if outcome.logprobs is not None:
            choice["logprobs"] = {"content": [
                {"token": text, "logprob": lp, "bytes": list(raw), "top_logprobs": []}
                for text, raw, lp in outcome.logprobs
            ], "refusal": None}
        payload = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [choice] + [
                {"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                 "logprobs": None, "finish_reason": "stop"}
                for i, text in enumerate(outcome.alternatives, start=1)],
            "usage": {
                "prompt_tokens": outcome.prompt_tokens,
                "completion_tokens": outcome.completion_tokens,
                "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
            },
            "system_fingerprint": "fp_batchroute_sim",
        }
        headers = {"x-request-id": _request_id(), **self._limit_headers(outcome.limits)}
        if outcome.processing_ms is not None:
            headers["openai-processing-ms"] = str(outcome.processing_ms)
        return answer_reply(payload, headers, outcome.malformed)

    @staticmethod
    def _limit_headers(limits: Decision | None) -> dict[str, str]:
        headers: dict[str, str] = {}
        if limits is None:
            return headers
        for suffix, status in (("requests", limits.requests), ("tokens", limits.tokens)):
            if status is not None:
                headers[f"x-ratelimit-limit-{suffix}"] = str(status.limit)
                headers[f"x-ratelimit-remaining-{suffix}"] = str(status.remaining)
                headers[f"x-ratelimit-reset-{suffix}"] = _duration(status.reset_s)
        return headers


# --- Anthropic -------------------------------------------------------------------------

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "content_filter": "refusal",
    "stop_sequence": "stop_sequence",
}


class AnthropicProtocol:
    name = "anthropic"

    def check_auth(self, headers: dict[str, str]) -> None:
        if headers.get("x-api-key", "").strip() == "invalid":
            raise ApiError(401, "authentication", "invalid x-api-key (simulated)")
        if not headers.get("anthropic-version"):
            raise ApiError(400, "invalid_request", "anthropic-version: header is required")

    def parse(self, body: dict[str, Any], headers: dict[str, str]) -> ChatRequest:
        model = _check_model(body)
        if "max_tokens" not in body:
            raise ApiError(400, "invalid_request", "max_tokens: Field required", "max_tokens")
        max_tokens = _check_max_tokens(body.get("max_tokens"), "max_tokens")
        messages = _check_messages(body.get("messages"))
        system = body.get("system")
        if system is not None and not isinstance(system, str | list):
            raise ApiError(400, "invalid_request", "system: must be a string or text blocks")
        system_text = message_text(system)
        normalised = [{"role": "system", "content": system_text}] if system_text else []
        normalised += [{"role": m["role"], "content": message_text(m.get("content"))}
                       for m in messages]
        return ChatRequest(model=model, messages=normalised, max_tokens=max_tokens,
                           stop=_stops(body.get("stop_sequences"), "stop_sequences"))

    def error(self, status: int, kind: str, message: str, param: str | None = None,
              limit_type: str | None = None, retry_after_s: float | None = None,
              limits: Decision | None = None) -> Reply:
        typ = _ANTHROPIC_TYPES.get(status, "api_error")
        payload = {"type": "error", "error": {"type": typ, "message": message}}
        rid = _request_id()
        headers = {"request-id": rid, "x-request-id": rid, **_retry_headers(retry_after_s),
                   **self._limit_headers(limits)}
        return json_reply(status, payload, headers)

    def render(self, outcome: Outcome, req: ChatRequest) -> Reply:
        if isinstance(outcome, Failure):
            return self.error(outcome.status, outcome.kind, outcome.message,
                              limit_type=outcome.limit_type, retry_after_s=outcome.retry_after_s,
                              limits=outcome.limits)
        assert isinstance(outcome, Success)
        payload = {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": req.model,
            "content": [{"type": "text", "text": outcome.content}],
            "stop_reason": _STOP_REASONS.get(outcome.finish_reason, "end_turn"),
            "stop_sequence": outcome.stop_sequence,
            "usage": {"input_tokens": outcome.prompt_tokens,
                      "output_tokens": outcome.completion_tokens},
        }
        rid = _request_id()
        headers = {"request-id": rid, "x-request-id": rid, **self._limit_headers(outcome.limits)}
        return answer_reply(payload, headers, outcome.malformed)

    @staticmethod
    def _limit_headers(limits: Decision | None) -> dict[str, str]:
        headers: dict[str, str] = {}
        if limits is None:
            return headers
        now = time.time()
        statuses: tuple[tuple[str, LimitStatus | None], ...] = (
            ("requests", limits.requests), ("tokens", limits.tokens))
        for suffix, status in statuses:
            if status is not None:
                # RFC 3339, rounded up to the second: never earlier than the real reset.
                reset_at = datetime.fromtimestamp(math.ceil(now + status.reset_s), UTC)
                reset = reset_at.isoformat(timespec="seconds")
                headers[f"anthropic-ratelimit-{suffix}-limit"] = str(status.limit)
                headers[f"anthropic-ratelimit-{suffix}-remaining"] = str(status.remaining)
                headers[f"anthropic-ratelimit-{suffix}-reset"] = reset.replace("+00:00", "Z")
        return headers
