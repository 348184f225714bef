"""Anthropic's Message Batches API, simulated
(https://docs.anthropic.com/en/api/creating-message-batches).

Endpoints: ``POST /v1/messages/batches`` with ``{"requests": [{"custom_id", "params"}]}``
(``params`` is a Messages API request body), ``GET /v1/messages/batches/{id}``,
``GET /v1/messages/batches/{id}/results`` (JSONL), ``POST .../{id}/cancel``.

Documented formats reproduced here:

* batch object: ``id`` ("msgbatch_..."), ``type="message_batch"``, ``processing_status``
  (in_progress, canceling, ended), ``request_counts{processing, succeeded, errored,
  canceled, expired}`` (requests stay "processing" until the whole batch ends),
  ``created_at, expires_at, ended_at, cancel_initiated_at, archived_at`` (RFC 3339),
  ``results_url`` (null until ended);
* results line: ``{"custom_id", "result": {"type": "succeeded", "message": {...}}}``,
  ``{"type": "errored", "error": {"type": "error", "error": {"type", "message"}}}``,
  ``{"type": "canceled"}`` or ``{"type": "expired"}``; not in input order (the docs say
  to map by ``custom_id``; the sim reverses them);
* ``custom_id`` must match ``^[a-zA-Z0-9_-]{1,64}$`` and be unique in the batch;
  ``params`` are validated asynchronously (a bad request ends ``errored``).

Limits (documented): 100,000 requests or 256 MB per batch, whichever comes first;
refused at creation with the error shape of the Messages API (400
``invalid_request_error``, 413 ``request_too_large``).
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from typing import Any

from batchroute.sim.batches import (
    BatchJob,
    BatchRegistry,
    jsonl,
    new_id,
    run_request,
)
from batchroute.sim.protocols import AnthropicProtocol, ApiError, Reply, json_reply

_PROTOCOL = AnthropicProtocol()
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_BATCH_PATH = re.compile(r"^/v1/messages/batches/([^/]+)(/results|/cancel)?$")
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 413: "request_too_large"}


def _error(status: int, message: str) -> Reply:
    return json_reply(status, {"type": "error", "error": {
        "type": _ERROR_TYPES.get(status, "api_error"), "message": message}},
        {"request-id": new_id("req_")})


def handle(registry: BatchRegistry, method: str, path: str, body: bytes,
           headers: dict[str, str], query: dict[str, str] | None = None) -> Reply:
    try:
        _PROTOCOL.check_auth(headers)
    except ApiError as e:
        return _error(e.status, e.message)
    if path == "/v1/messages/batches" and method == "POST":
        return _create(registry, body, headers)
    if path == "/v1/messages/batches" and method == "GET":
        base = f"http://{headers.get('host', '127.0.0.1')}"
        page, more = registry.listing("anthropic", query)
        data = [batch_object(registry, job, base) for job in page]
        return json_reply(200, {"data": data, "has_more": more,
                                "first_id": data[0]["id"] if data else None,
                                "last_id": data[-1]["id"] if data else None})
    m = _BATCH_PATH.match(path)
    if m is None:
        return _error(404, f"Not found: {method} {path}")
    job = registry.get_job("anthropic", m.group(1))
    if job is None:
        return _error(404, f"Message batch {m.group(1)!r} not found.")
    base = f"http://{headers.get('host', '127.0.0.1')}"
    if m.group(2) == "/cancel" and method == "POST":
        registry.request_cancel(job)  # cancelling an ended batch returns it unchanged
        return json_reply(200, batch_object(registry, job, base))
    if m.group(2) == "/results" and method == "GET":
        if job.ended_at is None:
            return _error(400, f"Message batch {job.id} has not ended yet; results are "
                          "available once processing_status is 'ended'.")
        return Reply(200, job.result_file,
                     {"content-type": "application/binary"})
    if m.group(2) is None and method == "GET":
        return json_reply(200, batch_object(registry, job, base))
    return _error(404, f"Not found: {method} {path}")


def _create(registry: BatchRegistry, body: bytes, headers: dict[str, str]) -> Reply:
    settings = registry.engine.config.batch
    if len(body) > settings.anthropic_max_bytes:
        return _error(413, f"Request exceeds the maximum batch size of "
                      f"{settings.anthropic_max_bytes} bytes.")
    try:
        data = json.loads(body or b"null")
    except ValueError:
        return _error(400, "Request body is not valid JSON.")
    requests = data.get("requests") if isinstance(data, dict) else None
    if not isinstance(requests, list) or not requests:
        return _error(400, "requests: Field required (a non-empty list)")
    if len(requests) > settings.anthropic_max_requests:
        return _error(400, f"requests: a batch holds at most "
                      f"{settings.anthropic_max_requests} requests, got {len(requests)}")
    items: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for i, entry in enumerate(requests):
        custom_id = entry.get("custom_id") if isinstance(entry, dict) else None
        if not isinstance(custom_id, str) or not _CUSTOM_ID.match(custom_id):
            return _error(400, f"requests.{i}.custom_id: must match ^[a-zA-Z0-9_-]{{1,64}}$")
        if custom_id in seen:
            return _error(400, f"requests.{i}.custom_id: duplicate custom_id {custom_id!r}")
        seen.add(custom_id)
        params = entry.get("params")
        if not isinstance(params, dict):
            return _error(400, f"requests.{i}.params: Field required (an object)")
        items.append((custom_id, params))
    job = BatchJob(api="anthropic", id=new_id("msgbatch_"), created_at=time.time(),
                   delay_s=settings.delay_s, items=items,
                   limit=registry.expiry_limit(len(items)))
    registry.start(job, lambda cid, params: _compute(registry, cid, params),
                   lambda j: _finish(registry, j))
    return json_reply(200, batch_object(registry, job,
                                        f"http://{headers.get('host', '127.0.0.1')}"))


def _compute(registry: BatchRegistry, custom_id: str, params: Any) -> dict[str, Any]:
    """One request through the synchronous engine; the reply becomes a result line."""
    reply, payload = run_request(
        registry, _PROTOCOL, "anthropic_batch", params,
        {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}})
    if reply.status == 200:
        return {"custom_id": custom_id, "result": {"type": "succeeded", "message": payload}}
    return {"custom_id": custom_id, "result": {"type": "errored", "error": payload}}


def _finish(registry: BatchRegistry, job: BatchJob) -> None:
    """Write the results file: a line per request, reversed (map by custom_id)."""
    with registry.lock:
        results = dict(job.results)
    unfinished = "canceled" if job.cancel.is_set() else "expired"
    lines = list(results.values()) + [
        {"custom_id": cid, "result": {"type": unfinished}}
        for cid, _ in job.items if cid not in results]
    job.result_file = jsonl(lines[::-1])


def _rfc3339(value: float | None) -> str | None:
    if value is None:
        return None
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def batch_object(registry: BatchRegistry, job: BatchJob, base: str) -> dict[str, Any]:
    """The documented Message Batch object, derived from the job's timestamps."""
    with registry.lock:
        ended_at = job.ended_at
        results = dict(job.results)
    counts = {"processing": len(job.items), "succeeded": 0, "errored": 0, "canceled": 0,
              "expired": 0}
    if ended_at is not None:
        counts["processing"] = 0
        for cid, _ in job.items:
            result = results.get(cid)
            kind = result["result"]["type"] if result else (
                "canceled" if job.cancel.is_set() else "expired")
            counts[kind] += 1
        status = "ended"
    else:
        status = "canceling" if job.cancel_at is not None else "in_progress"
    return {
        "id": job.id, "type": "message_batch", "processing_status": status,
        "request_counts": counts,
        "ended_at": _rfc3339(ended_at), "created_at": _rfc3339(job.created_at),
        "expires_at": _rfc3339(job.expires_at),
        "cancel_initiated_at": _rfc3339(job.cancel_at), "archived_at": None,
        "results_url": f"{base}/v1/messages/batches/{job.id}/results" if ended_at else None,
    }
