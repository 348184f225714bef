"""Provider batch files: build the request lines, read the result lines (pure, no I/O).

Why pure: the parsing of what a provider sends back is the part that must be right
(custom_id mapping, per-line errors, hostile or truncated files), and it is tested
without any server. A result line's reply goes through the SAME adapter code as a
synchronous reply (``OpenAIAdapter.parse_response`` / ``AnthropicAdapter.parse_response``
on a synthetic response), so a batch answer is checked exactly as strictly
(providers/reply.py) and normalised to the same :class:`Completion`.

Formats (provider docs):

* OpenAI input line: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions",
  "body"}``; output/error line: ``{"id", "custom_id", "response": {"status_code",
  "request_id", "body"} | null, "error": {"code", "message"} | null}``.
* Anthropic create body: ``{"requests": [{"custom_id", "params"}]}``; results line:
  ``{"custom_id", "result": {"type": "succeeded", "message"} | {"type": "errored",
  "error": {"type": "error", "error": {"type", "message"}}} | {"type": "canceled"} |
  {"type": "expired"}}``.

Limits: OpenAI 50,000 requests / 200 MB per input file, one model per file; Anthropic
100,000 requests / 256 MB per batch. custom_id: Anthropic allows
``^[a-zA-Z0-9_-]{1,64}$``, so job ids that do not fit are mapped to a hash (the mapping
goes back with the batch).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from batchroute.completion import Completion
from batchroute.providers.anthropic import AnthropicAdapter, to_messages_request
from batchroute.providers.base import ErrorKind, ProviderError
from batchroute.providers.openai import FORWARDED
from batchroute.providers.openai import OpenAIAdapter as _OpenAIAdapter
from batchroute.providers.reply import MalformedReply, check_depth, decode_json

OPENAI_ENDPOINT = "/v1/chat/completions"
LIMITS = {  # (max requests, max bytes) per batch, as documented
    "openai": (50_000, 200 * 1024 * 1024),
    "anthropic": (100_000, 256 * 1024 * 1024),
}
MAX_LINE_BYTES = 8 * 1024 * 1024  # one result line; a real reply is far smaller
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class BatchTooLarge(ValueError):
    """The requests do not fit one provider batch (split them before building)."""


@dataclass(frozen=True)
class ItemResult:
    """The outcome of one request of a provider batch.

    ``state``: ``succeeded`` (``completion`` set), ``errored`` (``error`` set: the
    provider answered with an error, or its answer failed the reply checks), ``expired``
    or ``canceled`` (never executed: the caller sends the job on)."""

    custom_id: str
    state: str
    completion: Completion | None = None
    error: ProviderError | None = None


@dataclass
class ParsedResults:
    """Every line of a result file, keyed by custom_id, plus what was wrong with the file.

    ``problems`` lists lines that could not be mapped (not JSON, unknown or duplicate
    custom_id): a request whose id never appears is ``missing``, not silently dropped."""

    items: dict[str, ItemResult] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def missing(self, expected: Iterable[str]) -> list[str]:
        return [cid for cid in expected if cid not in self.items]


def custom_id_for(job_id: str) -> str:
    """A custom_id both APIs accept: the job id itself when it fits, else a stable hash."""
    if _CUSTOM_ID.match(job_id):
        return job_id
    return "h-" + hashlib.sha256(job_id.encode("utf-8")).hexdigest()[:40]


def custom_ids(job_ids: Iterable[str]) -> dict[str, str]:
    """custom_id -> job id for one batch; a hash collision (or a duplicate job) is an error
    because it would hand one job's answer to another."""
    mapping: dict[str, str] = {}
    for job_id in job_ids:
        cid = custom_id_for(job_id)
        if cid in mapping:
            raise ValueError(f"custom_id {cid!r} maps two jobs ({mapping[cid]!r}, {job_id!r})")
        mapping[cid] = job_id
    return mapping


def _check_limits(api: str, count: int, size: int) -> None:
    max_requests, max_bytes = LIMITS[api]
    if count == 0:
        raise BatchTooLarge(f"{api}: a batch needs at least one request")
    if count > max_requests:
        raise BatchTooLarge(f"{api}: {count} requests, the limit is {max_requests}")
    if size > max_bytes:
        raise BatchTooLarge(f"{api}: {size} bytes, the limit is {max_bytes}")


def openai_line(custom_id: str, api_model: str, body: dict[str, Any]) -> dict[str, Any]:
    """One input line; the body carries the same keys a synchronous call would send."""
    payload = {k: body[k] for k in FORWARDED if k in body}
    payload["model"] = api_model
    return {"custom_id": custom_id, "method": "POST", "url": OPENAI_ENDPOINT, "body": payload}


def openai_input_file(requests: Iterable[tuple[str, str, dict[str, Any]]]) -> bytes:
    """The JSONL input file for ``(custom_id, api_model, body)`` requests, within limits."""
    requests = list(requests)
    if len({model for _, model, _ in requests}) > 1:
        raise ValueError("openai: a batch holds requests for one model only (split by model)")
    lines = [json.dumps(openai_line(cid, model, body), ensure_ascii=False).encode("utf-8")
             for cid, model, body in requests]
    content = b"\n".join(lines) + b"\n" if lines else b""
    _check_limits("openai", len(lines), len(content))
    return content


def anthropic_request(custom_id: str, api_model: str, body: dict[str, Any]) -> dict[str, Any]:
    """One entry of ``requests``: the params a synchronous Messages call would send."""
    return {"custom_id": custom_id, "params": to_messages_request(api_model, body)}


def anthropic_create_body(requests: Iterable[tuple[str, str, dict[str, Any]]]) -> bytes:
    """The JSON body of ``POST /v1/messages/batches``, within limits."""
    entries = [anthropic_request(cid, model, body) for cid, model, body in requests]
    content = json.dumps({"requests": entries}, ensure_ascii=False).encode("utf-8")
    _check_limits("anthropic", len(entries), len(content))
    return content


Request = tuple[str, str, dict[str, Any]]  # (custom_id, api_model, job body)


def split_requests(api: str, requests: Iterable[Request]) -> list[list[Request]]:
    """Requests grouped into batches that each fit the API's limits (requests, bytes,
    one model per OpenAI file), in input order within a group. A single request too big
    for any batch raises BatchTooLarge: it has to go synchronously."""
    max_requests, max_bytes = LIMITS[api]
    line_of = openai_line if api == "openai" else anthropic_request
    groups: dict[str, list[list[Request]]] = {}
    sizes: dict[str, int] = {}
    for request in requests:
        cid, model, body = request
        size = len(json.dumps(line_of(cid, model, body), ensure_ascii=False).encode()) + 2
        if size + 20 > max_bytes:
            raise BatchTooLarge(f"{api}: request {cid!r} alone is {size} bytes, over the "
                                f"batch limit of {max_bytes}")
        key = model if api == "openai" else ""
        batches = groups.setdefault(key, [[]])
        if len(batches[-1]) >= max_requests or sizes.get(key, 20) + size > max_bytes:
            batches.append([])
            sizes[key] = 20  # room for {"requests": [...]}
        batches[-1].append(request)
        sizes[key] = sizes.get(key, 20) + size
    return [batch for batches in groups.values() for batch in batches if batch]


def _lines(content: bytes, parsed: ParsedResults) -> Iterable[tuple[int, dict[str, Any]]]:
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(raw) > MAX_LINE_BYTES:
            parsed.problems.append(f"line {number}: longer than {MAX_LINE_BYTES} bytes")
            continue
        try:
            line = decode_json(raw)
            check_depth(line)
        except MalformedReply as e:
            parsed.problems.append(f"line {number}: {e}")
            continue
        if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
            parsed.problems.append(f"line {number}: not an object with a string custom_id")
            continue
        yield number, line


def _keep(parsed: ParsedResults, expected: set[str], number: int, item: ItemResult) -> None:
    if item.custom_id not in expected:
        parsed.problems.append(f"line {number}: unknown custom_id {item.custom_id[:80]!r}")
    elif item.custom_id in parsed.items:
        parsed.problems.append(f"line {number}: duplicate custom_id {item.custom_id!r}")
    else:
        parsed.items[item.custom_id] = item


def _synthetic(status: int, body: Any, request_id: str) -> httpx.Response:
    """The reply a synchronous call would have received, for the adapters to check."""
    content = json.dumps(body, ensure_ascii=False).encode("utf-8")
    headers = {"content-type": "application/json", "x-request-id": request_id,
               "request-id": request_id}
    return httpx.Response(status, content=content, headers=headers)


def _from_reply(adapter: Any, custom_id: str, response: httpx.Response) -> ItemResult:
    try:
        completion = adapter.parse_response(response, 0.0)
    except ProviderError as e:
        return ItemResult(custom_id, "errored", error=e)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        error = ProviderError(ErrorKind.MALFORMED_REPLY, f"unreadable batch result "
                              f"({type(e).__name__}: {str(e)[:200]})", response.status_code)
        return ItemResult(custom_id, "errored", error=error)
    return ItemResult(custom_id, "succeeded", completion=completion)


_OPENAI_NOT_RUN = {"batch_expired": "expired", "batch_cancelled": "canceled"}


def parse_openai_results(content: bytes, expected: Iterable[str]) -> ParsedResults:
    """Lines of an OpenAI output and/or error file (pass both concatenated, or call twice
    and merge): the replies checked like synchronous ones, never-run lines by code."""
    parsed = ParsedResults()
    wanted = set(expected)
    adapter = _OpenAIAdapter()
    for number, line in _lines(content, parsed):
        cid = line["custom_id"]
        response, error = line.get("response"), line.get("error")
        if isinstance(response, dict) and isinstance(response.get("status_code"), int):
            request_id = response.get("request_id")
            item = _from_reply(adapter, cid, _synthetic(
                response["status_code"], response.get("body"),
                request_id if isinstance(request_id, str) else ""))
        elif isinstance(error, dict):
            code = str(error.get("code") or "")
            state = _OPENAI_NOT_RUN.get(code)
            if state is not None:
                item = ItemResult(cid, state)
            else:
                item = ItemResult(cid, "errored", error=ProviderError(
                    ErrorKind.INVALID_REQUEST,
                    f"batch line error {code[:80]}: {str(error.get('message'))[:300]}"))
        else:
            parsed.problems.append(f"line {number}: neither a response nor an error")
            continue
        _keep(parsed, wanted, number, item)
    return parsed


def parse_anthropic_results(content: bytes, expected: Iterable[str]) -> ParsedResults:
    """Lines of a Message Batches results file (``result.type`` succeeded / errored /
    canceled / expired); a succeeded message is checked like a synchronous reply."""
    parsed = ParsedResults()
    wanted = set(expected)
    adapter = AnthropicAdapter()
    for number, line in _lines(content, parsed):
        cid = line["custom_id"]
        result = line.get("result")
        kind = result.get("type") if isinstance(result, dict) else None
        if kind == "succeeded" and isinstance(result, dict):
            item = _from_reply(adapter, cid, _synthetic(200, result.get("message"), ""))
        elif kind == "errored" and isinstance(result, dict):
            error = result.get("error")
            status = 500 if _error_type(error) in ("api_error", "overloaded_error") else 400
            item = _from_reply(adapter, cid, _synthetic(status, error, ""))
        elif kind in ("canceled", "expired"):
            item = ItemResult(cid, str(kind))
        else:
            parsed.problems.append(f"line {number}: unknown result type {str(kind)[:40]!r}")
            continue
        _keep(parsed, wanted, number, item)
    return parsed


def _error_type(error: Any) -> str:
    inner = error.get("error") if isinstance(error, dict) else None
    return str(inner.get("type")) if isinstance(inner, dict) else ""
