"""Error replies of providers and gateways, classified; Retry-After in every header form.

The bodies are the ones those services send (copied from their source, docs and the
issues where users pasted them): a wording we fail to recognise sends a job that only
needs a larger window to `invalid_request` (failed), or a rate-limited job to fail
instead of waiting.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from batchroute.config import ProviderConfig
from batchroute.policy import Action, Position, after_error
from batchroute.providers import ErrorKind, ProviderError, call
from batchroute.providers.errors import classify, error_in_ok_body, reply_error
from batchroute.providers.retry_after import (
    MAX_RETRY_AFTER_S,
    capped,
    parse_duration,
    retry_after_in_message,
    retry_after_seconds,
)

NOW = 1_800_000_000.0  # a fixed wall clock for header forms that name an instant

# ---- context-window errors: every gateway's wording ---------------------------------------
LITELLM_PROXY_CONTEXT = {"error": {
    "message": "litellm.ContextWindowExceededError: litellm.BadRequestError: this is a mock "
               "context window exceeded error\nmodel=ctx. context_window_fallbacks=None. "
               "fallbacks=None.\n\nSet 'context_window_fallback' - "
               "https://docs.litellm.ai/docs/routing#fallbacks\n\nLiteLLM: model group 'ctx' "
               "failed with the error above. No fallback was attempted.",
    "type": "invalid_request_error", "param": None, "code": "400"}}
LITELLM_PROXY_CONTEXT_MESSAGES = {"type": "error", "error": {
    "type": "invalid_request_error",
    "message": "litellm.ContextWindowExceededError: litellm.BadRequestError: this is a mock "
               "context window exceeded error\nmodel=ctx. context_window_fallbacks=None."}}
OPENAI_CONTEXT = {"error": {
    "message": "This model's maximum context length is 8192 tokens. However, your messages "
               "resulted in 8227 tokens. Please reduce the length of the messages.",
    "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}
OPENAI_NEW_CONTEXT = {"error": {"message": "Your input exceeds the context window of this model. "
                                           "Please adjust your input and try again.",
                                "type": "invalid_request_error", "param": "input",
                                "code": "context_length_exceeded"}}
AZURE_CONTEXT = {"error": {
    "message": "This model's maximum context length is 128000 tokens. However, your messages "
               "resulted in 204308 tokens. Please reduce the length of the messages.",
    "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}
OPENROUTER_CONTEXT = {"error": {
    "message": "This endpoint's maximum context length is 262000 tokens. However, you requested "
               "about 263390 tokens (658 of text input, 732 of tool input, 262000 in the "
               "output). Please reduce the length of either one.",
    "code": 400, "metadata": {"provider_name": None}}}
OPENROUTER_UPSTREAM_CONTEXT = {"error": {
    "message": "Provider returned error", "code": 400,
    "metadata": {"raw": "{\"error\":{\"message\":\"This model's maximum context length is 262144 "
                        "tokens. However, your messages resulted in 262897 tokens. Please "
                        "reduce the length of the messages.\",\"type\":\"Bad Request\","
                        "\"code\":400}}",
                 "provider_name": "Nvidia", "is_byok": False, "provider_error_code": "400"}}}
VLLM_CONTEXT = {"object": "error",
                "message": "This model's maximum context length is 16384 tokens. However, you "
                           "requested 122946 tokens (112946 in the messages, 10000 in the "
                           "completion). Please reduce the length of the messages or "
                           "completion.",
                "type": "BadRequestError", "param": None, "code": 400}
VLLM_INPUT_CONTEXT = {"error": {"message": "The input (150000 tokens) is longer than the model's "
                                           "context length (128000 tokens).",
                                "type": "BadRequestError", "param": None, "code": 400}}
SGLANG_CONTEXT = {"object": "error",
                  "message": "Requested token count exceeds the model's maximum context length "
                             "of 64000 tokens. You requested a total of 71897 tokens: 7897 "
                             "tokens from the input messages and 64000 tokens for the "
                             "completion.",
                  "type": "BadRequestError", "param": None, "code": 400}
SGLANG_DETAIL = {"detail": "Requested token count exceeds the model's maximum context length of "
                           "4096 tokens."}
ANTHROPIC_CONTEXT = {"type": "error", "error": {
    "type": "invalid_request_error",
    "message": "prompt is too long: 210000 tokens > 200000 maximum"}}
GEMINI_COMPAT_CONTEXT = [{"error": {
    "code": 400, "message": "The input token count (1196265) exceeds the maximum number of tokens "
                            "allowed (1048575).", "status": "INVALID_ARGUMENT"}}]
MISTRAL_CONTEXT = {"object": "error", "message": "Prompt contains 40000 tokens and 0 draft tokens, "
                                                 "too large for model with 32768 maximum context "
                                                 "length", "type": "invalid_request_error"}
XAI_CONTEXT = {"code": "Client specified an invalid argument",
               "error": "This model's maximum prompt length is 131072 but the request contains "
                        "537812 tokens."}


@pytest.mark.parametrize("body", [
    LITELLM_PROXY_CONTEXT, LITELLM_PROXY_CONTEXT_MESSAGES, OPENAI_CONTEXT, OPENAI_NEW_CONTEXT,
    AZURE_CONTEXT, OPENROUTER_CONTEXT, OPENROUTER_UPSTREAM_CONTEXT, VLLM_CONTEXT,
    VLLM_INPUT_CONTEXT, SGLANG_CONTEXT, SGLANG_DETAIL, ANTHROPIC_CONTEXT, GEMINI_COMPAT_CONTEXT,
    MISTRAL_CONTEXT, XAI_CONTEXT,
], ids=["litellm-proxy", "litellm-proxy-messages", "openai", "openai-new", "azure", "openrouter",
        "openrouter-upstream", "vllm", "vllm-input", "sglang", "sglang-detail", "anthropic",
        "gemini-compat", "mistral", "xai"])
def test_context_window_errors_are_context_length(body: Any) -> None:
    error = classify(400, {}, json.dumps(body).encode())
    assert error.kind is ErrorKind.CONTEXT_LENGTH, error
    assert error.status == 400 and error.retry_after is None


def test_context_window_error_moves_the_job_to_a_larger_model() -> None:
    """The policy half: CONTEXT_LENGTH escalates (never retries the same window, never
    fails the job while a tier is left)."""
    error = classify(400, {}, json.dumps(LITELLM_PROXY_CONTEXT))
    pos = Position(tier_index=0, ladder_len=2, attempt_no=1, consecutive_errors=1,
                   has_failover=False)
    assert after_error(pos, error.kind, error.message).action is Action.ESCALATE
    top = Position(tier_index=1, ladder_len=2, attempt_no=2, consecutive_errors=1,
                   has_failover=False)
    decision = after_error(top, error.kind, error.message)
    assert decision.action is Action.FAIL and decision.error_code == "context_length_exceeded"


# ---- everything else ---------------------------------------------------------------------
AZURE_FILTER = {"error": {
    "message": "The response was filtered due to the prompt triggering Azure OpenAI's content "
               "management policy. Please modify your prompt and retry. To learn more about our "
               "content filtering policies please read our documentation: "
               "https://go.microsoft.com/fwlink/?linkid=2198766",
    "type": None, "param": "prompt", "code": "content_filter", "status": 400,
    "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
        "hate": {"filtered": False, "severity": "safe"},
        "violence": {"filtered": True, "severity": "medium"}}}}}
LITELLM_AZURE_FILTER = {"error": {
    "message": "litellm.BadRequestError: litellm.ContentPolicyViolationError: "
               "litellm.ContentPolicyViolationError: AzureException - The response was filtered "
               "due to the prompt triggering Azure OpenAI's content management policy.",
    "type": None, "param": None, "code": "400",
    "provider_specific_fields": {"innererror": {"code": "ResponsibleAIPolicyViolation"}}}}
ANTHROPIC_429 = {"type": "error", "error": {
    "type": "rate_limit_error",
    "message": "Number of requests has exceeded your per-minute rate limit"}}
ANTHROPIC_529 = {"type": "error", "error": {"details": None, "type": "overloaded_error",
                                            "message": "Overloaded"},
                 "request_id": "req_011CX7DwS7tSvggaNHmefwWg"}
LITELLM_429 = {"error": {"message": "litellm.RateLimitError: this is a mock rate limit error\n\n"
                                    "LiteLLM: model group 'rl' failed with the error above. No "
                                    "fallback was attempted.",
                         "type": "throttling_error", "param": None, "code": "429"}}
OPENAI_429 = {"error": {"message": "Rate limit reached for gpt-4o in organization org-x on tokens "
                                   "per min (TPM): Limit 30000, Used 29000, Requested 2000. Please "
                                   "try again in 2.5s.",
                        "type": "tokens", "param": None, "code": "rate_limit_exceeded"}}
AZURE_429 = {"error": {"code": "429", "message": "Requests to the ChatCompletions_Create Operation "
                       "under Azure OpenAI API version 2024-02-01 have exceeded token rate limit "
                       "of your current OpenAI S0 pricing tier. Please retry after 6 seconds."}}
ANTHROPIC_AUTH = {"type": "error", "error": {"type": "authentication_error",
                                             "message": "invalid x-api-key"}}
ANTHROPIC_MAX_TOKENS = {"type": "error", "error": {
    "type": "invalid_request_error",
    "message": "max_tokens: 10000 > 4096, which is the maximum allowed number of output tokens "
               "for claude-3-5-sonnet-20240620"}}


@pytest.mark.parametrize(("status", "body", "kind"), [
    (400, AZURE_FILTER, ErrorKind.CONTENT_FILTER),
    (400, LITELLM_AZURE_FILTER, ErrorKind.CONTENT_FILTER),
    (429, ANTHROPIC_429, ErrorKind.RATE_LIMITED),
    (529, ANTHROPIC_529, ErrorKind.OVERLOADED),
    (500, ANTHROPIC_529, ErrorKind.OVERLOADED),  # a gateway re-statusing Anthropic's overload
    (200, ANTHROPIC_529, ErrorKind.OVERLOADED),  # ... or sending it in a 200
    (400, ANTHROPIC_429, ErrorKind.RATE_LIMITED),  # the type wins over a gateway's 400
    (429, LITELLM_429, ErrorKind.RATE_LIMITED),
    (429, OPENAI_429, ErrorKind.RATE_LIMITED),  # "tokens per min" is no context error
    (429, AZURE_429, ErrorKind.RATE_LIMITED),
    (401, ANTHROPIC_AUTH, ErrorKind.AUTH),
    (400, ANTHROPIC_MAX_TOKENS, ErrorKind.INVALID_REQUEST),  # "maximum" alone is no window
    (404, {"error": {"message": "The model `gpt-9` does not exist", "type": "invalid_request_error",
                     "code": "model_not_found"}}, ErrorKind.INVALID_REQUEST),
    (503, "<html><body>503 Service Temporarily Unavailable</body></html>", ErrorKind.OVERLOADED),
    (502, "", ErrorKind.OVERLOADED),
    (408, {"detail": "timeout"}, ErrorKind.OVERLOADED),
    (200, {"error": {"code": 429, "message": "Rate limit exceeded: free-models-per-min.",
                     "metadata": {"headers": {"X-RateLimit-Limit": "20"}}}},
     ErrorKind.RATE_LIMITED),  # OpenRouter: an error object in a 200, the status as its code
    (200, {"error": {"code": 502, "message": "Upstream error from Together: Bad Gateway"}},
     ErrorKind.OVERLOADED),
    (200, {"error": {"message": "something went wrong"}}, ErrorKind.BAD_RESPONSE),
])
def test_error_shapes(status: int, body: Any, kind: ErrorKind) -> None:
    raw = body if isinstance(body, str) else json.dumps(body)
    error = classify(status, {}, raw.encode())
    assert error.kind is kind, error
    assert isinstance(error, ProviderError) and error.message


def test_retry_after_is_read_from_headers_then_from_the_message() -> None:
    headers = httpx.Headers({"llm_provider-retry-after": "7"})
    assert classify(429, headers, json.dumps(LITELLM_429)).retry_after == 7.0
    assert classify(529, {"retry-after": "3"}, json.dumps(ANTHROPIC_529)).retry_after == 3.0
    # No header: the prose says it (OpenAI's "try again in 2.5s", Azure's "retry after 6 s").
    assert classify(429, {}, json.dumps(OPENAI_429)).retry_after == pytest.approx(2.5)
    assert classify(429, {}, json.dumps(AZURE_429)).retry_after == pytest.approx(6.0)
    # Capped by the job's remaining deadline.
    assert classify(429, {"retry-after": "600"}, "{}", cap_s=30).retry_after == 30.0
    # Non-transient errors carry no wait even when a header is there.
    assert classify(400, {"retry-after": "5"}, json.dumps(OPENAI_CONTEXT)).retry_after is None


def test_errors_in_ok_bodies() -> None:
    assert error_in_ok_body({"error": {"code": 429, "message": "x"}})
    assert error_in_ok_body(ANTHROPIC_529) and error_in_ok_body(VLLM_CONTEXT)
    assert error_in_ok_body([{"error": {"message": "x"}}])
    assert not error_in_ok_body({"id": "c", "choices": [], "error": None})
    assert not error_in_ok_body({"content": [], "type": "message"})
    assert not error_in_ok_body("text")
    assert reply_error(200, {}, b'{"choices": []}') is None
    assert reply_error(200, {}, b'{"choices": [{"message": {"content": "\\"error\\""}}]}') is None
    assert reply_error(200, {}, b'{"choices": [], "error": null}') is None
    error = reply_error(200, {"retry-after": "2"},
                        b'{"error": {"code": 429, "message": "Rate limit exceeded"}}')
    assert error is not None and error.kind is ErrorKind.RATE_LIMITED and error.retry_after == 2
    error = reply_error(503, {}, b"upstream connect error")
    assert error is not None and error.kind is ErrorKind.OVERLOADED


def test_hostile_bodies_stay_bounded() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    assert classify(500, {}, deep).kind is ErrorKind.OVERLOADED
    huge = json.dumps({"error": {"message": "x" * 1_000_000, "code": "y" * 10_000}})
    error = classify(400, {}, huge)
    assert len(error.message) <= 1000 and error.kind is ErrorKind.INVALID_REQUEST


# ---- Retry-After: every header form ------------------------------------------------------
def _http_date(seconds_from_now: float) -> str:
    return format_datetime(datetime.fromtimestamp(NOW + seconds_from_now, UTC), usegmt=True)


def _rfc3339(seconds_from_now: float) -> str:
    return (datetime.fromtimestamp(NOW, UTC) + timedelta(seconds=seconds_from_now)).isoformat(
    ).replace("+00:00", "Z")


@pytest.mark.parametrize(("headers", "seconds"), [
    ({"retry-after": "3"}, 3.0),
    ({"Retry-After": "1.5"}, 1.5),  # floats, as OpenAI-compatible servers send
    ({"retry-after": "0"}, 0.0),
    ({"retry-after": _http_date(120)}, 120.0),
    ({"retry-after": _http_date(-50)}, 0.0),  # a date in the past: now
    ({"retry-after-ms": "250"}, 0.25),
    ({"retry-after-ms": "250", "retry-after": "1"}, 0.25),  # the precise one wins
    ({"llm_provider-retry-after": "4"}, 4.0),  # LiteLLM's proxy forwarding its upstream's
    ({"llm_provider-retry-after-ms": "1500"}, 1.5),
    ({"llm_provider-retry-after": _http_date(10)}, 10.0),
    ({"retry-after": "2", "llm_provider-retry-after": "9"}, 2.0),  # the proxy's own first
    ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),
    ({"x-ratelimit-reset-tokens": "20ms"}, 0.02),
    ({"x-ratelimit-reset-requests": "1m30s"}, 90.0),
    ({"x-ratelimit-reset-requests": "0.5s"}, 0.5),
    ({"x-ratelimit-reset-requests": "1h2m3.5s"}, MAX_RETRY_AFTER_S),  # 3723.5 s, capped
    ({"x-ratelimit-reset-requests": "59m3.5s"}, 3543.5),
    # The limit at 0 tells which reset applies, not the longest.
    ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s",
      "x-ratelimit-remaining-tokens": "5000", "x-ratelimit-reset-tokens": "40s"}, 2.0),
    ({"llm_provider-x-ratelimit-reset-requests": "3s"}, 3.0),
    ({"anthropic-ratelimit-requests-reset": _rfc3339(12)}, 12.0),
    ({"anthropic-ratelimit-requests-remaining": "10",
      "anthropic-ratelimit-requests-reset": _rfc3339(5),
      "anthropic-ratelimit-input-tokens-remaining": "0",
      "anthropic-ratelimit-input-tokens-reset": _rfc3339(30),
      "anthropic-ratelimit-output-tokens-reset": _rfc3339(50)}, 30.0),
    ({"anthropic-ratelimit-tokens-reset": "2026-12-04T09:00:00+00:00"}, 0.0),  # in the past
    ({"x-ratelimit-reset": str(int((NOW + 45) * 1000))}, 45.0),  # OpenRouter: epoch ms
    ({"x-ratelimit-reset": str(int(NOW + 20))}, 20.0),  # epoch seconds
    ({"x-ratelimit-reset": "17"}, 17.0),  # small: seconds from now
    ({}, None),
    ({"content-type": "application/json"}, None),
])
def test_retry_after_header_forms(headers: dict[str, str], seconds: float | None) -> None:
    got = retry_after_seconds(httpx.Headers(headers), now=NOW)
    assert got == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize("value", ["soon", "-3", "inf", "nan", "Infinity", "-inf", "", "1e999",
                                   "3 s", "Mon, 99 Foo 2026", "12abc"])
def test_garbage_retry_after_is_ignored(value: str) -> None:
    assert retry_after_seconds({"retry-after": value}, now=NOW) is None
    assert retry_after_seconds({"retry-after-ms": value}, now=NOW) is None
    assert retry_after_seconds({"x-ratelimit-reset-requests": value}, now=NOW) is None
    assert retry_after_seconds({"anthropic-ratelimit-requests-reset": value}, now=NOW) is None
    # ... and the next form is still read.
    assert retry_after_seconds({"retry-after": value, "llm_provider-retry-after": "5"},
                               now=NOW) == 5.0


def test_retry_after_caps() -> None:
    assert retry_after_seconds({"retry-after": "86400"}) == MAX_RETRY_AFTER_S
    assert retry_after_seconds({"retry-after": "86400"}, cap_s=90) == 90
    assert retry_after_seconds({"retry-after": "3"}, cap_s=90) == 3
    assert retry_after_seconds({"retry-after": "3"}, cap_s=-5) == 0.0  # deadline passed
    assert retry_after_seconds({"retry-after": "3"}, cap_s=float("nan")) == 3
    assert retry_after_seconds({"x-ratelimit-reset": str(NOW + 10**7)}, now=NOW) == (
        MAX_RETRY_AFTER_S)
    assert capped(20.0, cap_s=5.0) == 5.0 and capped(2.0, cap_s=5.0) == 2.0
    assert capped(float("inf")) == MAX_RETRY_AFTER_S and capped(float("inf"), 9) == 9
    assert capped(float("nan")) is None and capped(-1.0) is None and capped(None, 3) is None


def test_durations_and_prose() -> None:
    assert parse_duration("6m0s") == 360.0 and parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("1.5") == 1.5 and parse_duration("") is None
    assert parse_duration("s") is None and parse_duration("5x") is None
    assert retry_after_in_message("Please try again in 6ms.") == pytest.approx(0.006)
    assert retry_after_in_message("Please retry after 6 seconds.") == 6.0
    assert retry_after_in_message("Please try again in 20s.") == 20.0
    assert retry_after_in_message("Overloaded") is None


def test_base_keeps_the_old_name() -> None:
    from batchroute.providers.base import parse_retry_after

    assert parse_retry_after(httpx.Headers({"llm_provider-retry-after": "2"})) == 2.0


# ---- both adapters, over real HTTP, on the error path -------------------------------------
class _Canned(BaseHTTPRequestHandler):
    """Answers every POST with the (status, headers, body) the test put on the server."""

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self.rfile.read(int(self.headers.get("content-length", 0)))
        status, headers, body = self.server.reply  # type: ignore[attr-defined]
        self.send_response(status)
        for k, v in {"content-type": "application/json", **headers}.items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def canned() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _call(server: ThreadingHTTPServer, kind: str, status: int, headers: dict[str, str],
          body: Any) -> ProviderError:
    server.reply = (status, headers, json.dumps(body).encode())  # type: ignore[attr-defined]
    provider = ProviderConfig(name="p", kind=kind,
                              base_url=f"http://127.0.0.1:{server.server_address[1]}/v1")
    with httpx.Client() as client, pytest.raises(ProviderError) as e:
        call(client, provider, provider.base_url, "m",
             {"messages": [{"role": "user", "content": "hi"}]})
    return e.value


@pytest.mark.parametrize(("kind", "status", "headers", "body", "error_kind", "wait"), [
    ("openai", 400, {}, LITELLM_PROXY_CONTEXT, ErrorKind.CONTEXT_LENGTH, None),
    ("openai", 400, {}, VLLM_CONTEXT, ErrorKind.CONTEXT_LENGTH, None),
    ("openai", 400, {}, AZURE_FILTER, ErrorKind.CONTENT_FILTER, None),
    ("openai", 429, {"llm_provider-retry-after": "4"}, LITELLM_429, ErrorKind.RATE_LIMITED, 4.0),
    ("openai", 200, {"retry-after-ms": "1500"},
     {"error": {"code": 429, "message": "Rate limit exceeded: free-models-per-min."}},
     ErrorKind.RATE_LIMITED, 1.5),
    ("anthropic", 400, {}, ANTHROPIC_CONTEXT, ErrorKind.CONTEXT_LENGTH, None),
    ("anthropic", 400, {}, LITELLM_PROXY_CONTEXT_MESSAGES, ErrorKind.CONTEXT_LENGTH, None),
    ("anthropic", 529, {"retry-after": "2"}, ANTHROPIC_529, ErrorKind.OVERLOADED, 2.0),
    ("anthropic", 429, {"anthropic-ratelimit-requests-remaining": "0",
                        "anthropic-ratelimit-requests-reset": "2000-01-01T00:00:00Z"},
     ANTHROPIC_429, ErrorKind.RATE_LIMITED, 0.0),
    ("anthropic", 200, {}, ANTHROPIC_529, ErrorKind.OVERLOADED, None),
])
def test_adapters_classify_error_replies(canned: ThreadingHTTPServer, kind: str, status: int,
                                         headers: dict[str, str], body: Any,
                                         error_kind: ErrorKind, wait: float | None) -> None:
    error = _call(canned, kind, status, headers, body)
    assert error.kind is error_kind, error
    assert error.retry_after == wait


def test_pacing_reads_rate_limit_headers_forwarded_by_litellm() -> None:
    """On a 200, the pools read ``remaining: 0`` + reset; behind LiteLLM's proxy an
    Anthropic upstream's headers arrive only as ``llm_provider-anthropic-ratelimit-*``."""
    from batchroute.ratelimit import header_block_s

    forwarded = {"llm_provider-anthropic-ratelimit-requests-remaining": "0",
                 "llm_provider-anthropic-ratelimit-requests-reset": _rfc3339(8)}
    assert header_block_s(forwarded, now_wall=NOW) == pytest.approx(8.0)
    assert header_block_s({"llm_provider-x-ratelimit-remaining-tokens": "0",
                           "llm_provider-x-ratelimit-reset-tokens": "1.5s"}) == 1.5
    # The unprefixed header (the proxy's own view) wins over the forwarded one.
    assert header_block_s({"x-ratelimit-remaining-requests": "5",
                           "llm_provider-x-ratelimit-remaining-requests": "0",
                           "x-ratelimit-reset-requests": "3s"}) == 0.0
