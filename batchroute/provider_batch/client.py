"""HTTP calls of the provider batch APIs: submit, poll, fetch results, cancel.

One small client per API with the same methods, so the provider-batch runner
(``runner.py``) drives OpenAI's Files + Batches API and Anthropic's Message Batches API the
same way. Every call has a timeout and every body read is capped (results files can be
hundreds of MB: ``max_result_bytes``), and every failure is a ``ProviderError`` with
the same kinds as synchronous calls, so the caller's retry rules apply unchanged.

``submit`` is two calls for OpenAI (upload, then create): the file id comes back first,
so a caller that records it before ``create`` can tell after a crash whether the upload
already happened (the "no double submission" rule of #18 is the pipeline's to keep).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from batchroute.provider_batch import formats
from batchroute.providers.anthropic import API_VERSION
from batchroute.providers.base import ErrorKind, ProviderError, http_error
from batchroute.providers.body import BadEncoding, ReplyTooLarge, keep, read_capped
from batchroute.providers.errors import reply_error
from batchroute.providers.reply import MalformedReply, decode_json

MAX_STATUS_BYTES = 1024 * 1024  # a batch object is ~1 KB; errors.data is capped by the API
DEFAULT_MAX_RESULT_BYTES = 1024 * 1024 * 1024
# The lookup of a batch whose submitter died reads at most this many pages of 100: a busy
# account's newest 5,000 batches (it stops sooner, at the first batch older than ours).
RECENT_PAGES = 50

#: Provider statuses after which nothing changes any more.
ENDED = {"completed", "expired", "cancelled", "failed", "ended"}


@dataclass(frozen=True)
class BatchStatus:
    """A provider batch as polled, normalised across the two APIs.

    ``status`` is the provider's own word (OpenAI ``status``, Anthropic
    ``processing_status``); ``ended`` says whether results are final; ``counts`` is the
    provider's ``request_counts``; ``result_refs`` the file ids (OpenAI: output then error
    file) or the results URL (Anthropic) to fetch."""

    id: str
    status: str
    ended: bool
    counts: dict[str, int] = field(default_factory=dict)
    result_refs: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict)


class _Http:
    def __init__(self, client: httpx.Client, base_url: str, headers: dict[str, str],
                 timeout_s: float, max_result_bytes: int) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.headers = headers
        self.timeout = httpx.Timeout(timeout_s)
        self.max_result_bytes = max_result_bytes

    def send(self, method: str, path_or_url: str, max_bytes: int, **kwargs: Any) -> bytes:
        """The body of a 2xx answer (capped); a ProviderError for anything else."""
        url = path_or_url if "://" in path_or_url else f"{self.base_url}{path_or_url}"
        request = self.client.build_request(method, url, headers=self.headers,
                                            timeout=self.timeout, **kwargs)
        try:
            response = self.client.send(request, stream=True)
            try:
                content = read_capped(response, max_bytes)
            finally:
                response.close()
        except ReplyTooLarge as e:
            raise ProviderError(ErrorKind.REPLY_TOO_LARGE, str(e)) from None
        except BadEncoding as e:
            raise ProviderError(ErrorKind.MALFORMED_REPLY, str(e)) from None
        except httpx.TimeoutException as e:
            raise ProviderError(ErrorKind.TIMEOUT, f"{method} {url}: {type(e).__name__}") from None
        except (httpx.TransportError, httpx.StreamError) as e:
            raise ProviderError(ErrorKind.CONNECTION, f"{type(e).__name__}: {e}") from None
        response = keep(response, content)
        error = reply_error(response.status_code, response.headers, content)
        if error is not None:
            raise http_error(error, response)
        return content

    def json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        data = self._decoded(method, path, **kwargs)
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise ProviderError(ErrorKind.MALFORMED_REPLY,
                                f"{method} {path}: no object with a string id")
        return data

    def page(self, path: str) -> tuple[list[dict[str, Any]], bool]:
        """(the ``data`` of a list endpoint: its objects that have a string id, whether
        the endpoint says more follow)."""
        data = self._decoded("GET", path)
        items = data.get("data") if isinstance(data, dict) else None
        more = isinstance(data, dict) and data.get("has_more") is True
        return [d for d in (items if isinstance(items, list) else [])
                if isinstance(d, dict) and isinstance(d.get("id"), str)], more

    def pages(self, path: str, cursor: str, max_pages: int) -> Iterator[dict[str, Any]]:
        """Every object of a paged list endpoint, newest first, fetched a page (100) at a
        time as the caller reads on; ``cursor`` names the API's "older than this id"
        parameter. At most ``max_pages`` pages, and it stops when a page adds no new id
        (a provider that ignores the cursor cannot loop it)."""
        seen: set[str] = set()
        after = ""
        for _ in range(max_pages):
            sep = "&" if "?" in path else "?"
            query = f"{sep}limit=100" + (f"&{cursor}={quote(after, safe='')}" if after else "")
            items, more = self.page(path + query)
            fresh = [d for d in items if d["id"] not in seen]
            yield from fresh
            if not more or not fresh:
                return
            seen.update(d["id"] for d in fresh)
            after = fresh[-1]["id"]

    def _decoded(self, method: str, path: str, **kwargs: Any) -> Any:
        content = self.send(method, path, MAX_STATUS_BYTES, **kwargs)
        try:
            return decode_json(content)
        except MalformedReply as e:
            raise ProviderError(ErrorKind.MALFORMED_REPLY, f"{method} {path}: {e}") from None


def _origin(url: str) -> tuple[str, str, int | None]:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        return ("", "", None)
    return (parsed.scheme, parsed.host, parsed.port)


def _counts(raw: Any) -> dict[str, int]:
    if not isinstance(raw, dict):
        return {}
    return {str(k)[:40]: v for k, v in raw.items()
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31}


class OpenAIBatchClient:
    """Files + Batches API (``base_url`` ends in ``/v1``, like the synchronous adapter)."""

    api = "openai"

    def __init__(self, client: httpx.Client, base_url: str, api_key: str | None,
                 timeout_s: float = 60.0,
                 max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = _Http(client, base_url, headers, timeout_s, max_result_bytes)

    def upload(self, content: bytes, filename: str = "batch.jsonl") -> str:
        data = self._http.json("POST", "/files", data={"purpose": "batch"},
                               files={"file": (filename, content, "application/jsonl")})
        return str(data["id"])

    def create(self, input_file_id: str, metadata: dict[str, str] | None = None) -> str:
        body: dict[str, Any] = {"input_file_id": input_file_id,
                                "endpoint": formats.OPENAI_ENDPOINT,
                                "completion_window": "24h"}
        if metadata:
            body["metadata"] = metadata
        return str(self._http.json("POST", "/batches", json=body)["id"])

    def submit(self, content: bytes, metadata: dict[str, str] | None = None) -> str:
        return self.create(self.upload(content), metadata)

    def poll(self, batch_id: str) -> BatchStatus:
        return self._status(self._http.json("GET", f"/batches/{batch_id}"))

    def cancel(self, batch_id: str) -> BatchStatus:
        return self._status(self._http.json("POST", f"/batches/{batch_id}/cancel"))

    def recent(self, max_pages: int = RECENT_PAGES) -> Iterator[BatchStatus]:
        """The account's batches, newest first, paged as read (a submitter that died
        before storing an id looks its batch up here; the caller stops reading once the
        batches are older than the one it looks for)."""
        return (self._status(d) for d in self._http.pages("/batches", "after", max_pages))

    def results(self, status: BatchStatus) -> bytes:
        """Output file then error file, one JSONL (parse with ``parse_openai_results``)."""
        parts = [self._http.send("GET", f"/files/{ref}/content",
                                 self._http.max_result_bytes) for ref in status.result_refs]
        return b"\n".join(parts)

    @staticmethod
    def _status(data: dict[str, Any]) -> BatchStatus:
        status = str(data.get("status"))[:40]
        refs = tuple(str(data[k])[:200] for k in ("output_file_id", "error_file_id")
                     if isinstance(data.get(k), str))
        errors_obj = data.get("errors")
        errors = errors_obj.get("data") if isinstance(errors_obj, dict) else None
        messages = tuple(f"line {e.get('line')}: {e.get('code')}: {str(e.get('message'))[:200]}"
                         for e in (errors if isinstance(errors, list) else [])[:20]
                         if isinstance(e, dict))
        return BatchStatus(id=str(data["id"]), status=status, ended=status in ENDED,
                           counts=_counts(data.get("request_counts")), result_refs=refs,
                           errors=messages, raw=data)


class AnthropicBatchClient:
    """Message Batches API (``base_url`` ends in ``/v1``, like the synchronous adapter)."""

    api = "anthropic"

    def __init__(self, client: httpx.Client, base_url: str, api_key: str | None,
                 timeout_s: float = 60.0,
                 max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES) -> None:
        headers = {"anthropic-version": API_VERSION, "content-type": "application/json"}
        if api_key:
            headers["x-api-key"] = api_key
        self._http = _Http(client, base_url, headers, timeout_s, max_result_bytes)

    def submit(self, content: bytes, metadata: dict[str, str] | None = None) -> str:
        """``content`` from ``formats.anthropic_create_body`` (already JSON)."""
        return str(self._http.json("POST", "/messages/batches", content=content)["id"])

    def poll(self, batch_id: str) -> BatchStatus:
        return self._status(self._http.json("GET", f"/messages/batches/{batch_id}"))

    def cancel(self, batch_id: str) -> BatchStatus:
        return self._status(self._http.json("POST", f"/messages/batches/{batch_id}/cancel"))

    def recent(self, max_pages: int = RECENT_PAGES) -> Iterator[BatchStatus]:
        """The account's batches, newest first, paged as read (see OpenAIBatchClient)."""
        return (self._status(d)
                for d in self._http.pages("/messages/batches", "after_id", max_pages))

    def results(self, status: BatchStatus) -> bytes:
        """The results JSONL (parse with ``parse_anthropic_results``)."""
        if not status.result_refs:
            raise ProviderError(ErrorKind.MALFORMED_REPLY,
                                f"batch {status.id} ended without a results_url")
        url = status.result_refs[0]
        if _origin(url) != _origin(self._http.base_url):
            # The API key goes with this request: never to a host the reply named, only to
            # the configured one (a hostile or misconfigured gateway cannot harvest it).
            url = f"/messages/batches/{status.id}/results"
        return self._http.send("GET", url, self._http.max_result_bytes)

    @staticmethod
    def _status(data: dict[str, Any]) -> BatchStatus:
        status = str(data.get("processing_status"))[:40]
        url = data.get("results_url")
        return BatchStatus(id=str(data["id"]), status=status, ended=status == "ended",
                           counts=_counts(data.get("request_counts")),
                           result_refs=(url[:2000],) if isinstance(url, str) else (), raw=data)


BatchClient = OpenAIBatchClient | AnthropicBatchClient


def wait(client: BatchClient, batch_id: str, deadline_s: float,
         interval_s: float = 30.0) -> BatchStatus:
    """Poll until the batch ends or ``deadline_s`` passes (then the last status, not
    ended: the caller decides whether to cancel). For tests and one-shot tools; the
    pipeline polls from the beat scheduler instead of blocking a worker."""
    stop_at = time.monotonic() + deadline_s
    while True:
        status = client.poll(batch_id)
        if status.ended or time.monotonic() >= stop_at:
            return status
        time.sleep(max(0.0, min(interval_s, stop_at - time.monotonic())))


def parse(client: BatchClient, content: bytes, expected: list[str]) -> formats.ParsedResults:
    """Results of ``client``'s API, checked and keyed by custom_id."""
    if client.api == "openai":
        return formats.parse_openai_results(content, expected)
    return formats.parse_anthropic_results(content, expected)
