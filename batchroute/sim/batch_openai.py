"""OpenAI's Files + Batches API, simulated (https://platform.openai.com/docs/api-reference/batch).

Endpoints: ``POST /v1/files`` (multipart, ``purpose=batch``), ``GET /v1/files/{id}`` and
``/v1/files/{id}/content``, ``POST /v1/batches`` (``input_file_id``, ``endpoint`` =
``/v1/chat/completions``, ``completion_window`` = ``24h``), ``GET /v1/batches/{id}``,
``POST /v1/batches/{id}/cancel``.

Documented formats reproduced here:

* input line: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}``;
* batch object: ``id, object="batch", endpoint, errors, input_file_id, completion_window,
  status, output_file_id, error_file_id, created_at, in_progress_at, expires_at,
  finalizing_at, completed_at, failed_at, expired_at, cancelling_at, cancelled_at,
  request_counts{total, completed, failed}, metadata``; ``status`` one of validating,
  failed, in_progress, finalizing, completed, expired, cancelling, cancelled;
* output line: ``{"id": "batch_req_...", "custom_id", "response": {"status_code",
  "request_id", "body"}, "error": null}``; lines are NOT in input order (the docs say to
  map by ``custom_id``; the sim reverses them so a client that relies on order fails);
* error file line: the same shape, for requests that got a non-200 ``response``, and with
  ``"response": null, "error": {"code", "message"}`` for requests never executed
  (``batch_expired`` on expiry, ``batch_cancelled`` on cancel, the documented codes);
* a malformed input file fails the batch with ``errors = {"object": "list", "data":
  [{"code", "message", "param", "line"}]}``. The codes for each rule are the simulator's
  own (the docs do not list them all).

Limits (documented): 50,000 requests and 200 MB per input file, one model per batch.
Too big a file is refused at upload (400 ``invalid_request_error``); too many lines fail
the batch at validation, as the real API does.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from batchroute.sim.batches import (
    BatchJob,
    BatchRegistry,
    jsonl,
    new_id,
    parse_multipart,
    run_request,
)
from batchroute.sim.protocols import ApiError, OpenAIProtocol, Reply, json_reply

ENDPOINT = "/v1/chat/completions"
_PROTOCOL = OpenAIProtocol()
_BATCH_PATH = re.compile(r"^/v1/batches/([^/]+)(/cancel)?$")
_FILE_PATH = re.compile(r"^/v1/files/([^/]+)(/content)?$")


def _error(status: int, message: str, code: str | None = None,
           param: str | None = None, typ: str = "invalid_request_error") -> Reply:
    return json_reply(status, {"error": {"message": message, "type": typ, "param": param,
                                         "code": code}})


def handle(registry: BatchRegistry, method: str, path: str, body: bytes,
           headers: dict[str, str], query: dict[str, str] | None = None) -> Reply:
    try:
        _PROTOCOL.check_auth(headers)
    except ApiError as e:
        return _error(e.status, e.message, "invalid_api_key")
    if path == "/v1/files" and method == "POST":
        return _upload(registry, body, headers)
    if path == "/v1/batches" and method == "POST":
        return _create(registry, body)
    if path == "/v1/batches" and method == "GET":
        page, more = registry.listing("openai", query)
        data = [batch_object(registry, job) for job in page]
        return json_reply(200, {"object": "list", "data": data, "has_more": more,
                                "first_id": data[0]["id"] if data else None,
                                "last_id": data[-1]["id"] if data else None})
    if m := _FILE_PATH.match(path):
        stored = registry.get_file(m.group(1))
        if stored is None or method != "GET":
            return _error(404, f"No such File object: {m.group(1)}", param="id")
        if m.group(2):
            return Reply(200, stored.content, {"content-type": "application/octet-stream"})
        return json_reply(200, _file_object(stored.id, stored.filename, stored.purpose,
                                            len(stored.content), stored.created_at))
    if m := _BATCH_PATH.match(path):
        job = registry.get_job("openai", m.group(1))
        if job is None:
            return _error(404, f"No batch found with id '{m.group(1)}'.", param="id")
        if m.group(2) and method == "POST":
            if not registry.request_cancel(job):
                return _error(400, f"Cannot cancel a batch with status '{job.ended_as}'.")
            return json_reply(200, batch_object(registry, job))
        if not m.group(2) and method == "GET":
            return json_reply(200, batch_object(registry, job))
    return _error(404, f"Unknown request URL: {method} {path}", "unknown_url")


def _file_object(file_id: str, filename: str, purpose: str, size: int,
                 created_at: int) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "bytes": size, "created_at": created_at,
            "filename": filename, "purpose": purpose}


def _upload(registry: BatchRegistry, body: bytes, headers: dict[str, str]) -> Reply:
    content_type = headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return _error(400, "Expected a multipart/form-data body with 'file' and 'purpose'.")
    fields = parse_multipart(content_type, body)
    purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace").strip()
    if "file" not in fields:
        return _error(400, "Missing required parameter: 'file'.", param="file")
    if purpose != "batch":
        return _error(400, f"Invalid value for 'purpose': {purpose!r} (the sim stores batch "
                      "input files only).", param="purpose")
    filename, content = fields["file"]
    limit = registry.engine.config.batch.openai_max_bytes
    if len(content) > limit:
        return _error(400, f"File is too large: {len(content)} bytes; the maximum size of "
                      f"a batch input file is {limit} bytes.", "file_too_large", "file")
    stored = registry.add_file(filename or "batch.jsonl", "batch", content)
    return json_reply(200, _file_object(stored.id, stored.filename, "batch", len(content),
                                        stored.created_at))


def _create(registry: BatchRegistry, body: bytes) -> Reply:
    try:
        data = json.loads(body or b"null")
    except ValueError:
        return _error(400, "We could not parse the JSON body of your request.")
    if not isinstance(data, dict):
        return _error(400, "The request body must be a JSON object.")
    if data.get("endpoint") != ENDPOINT:
        return _error(400, f"Invalid value for 'endpoint': the sim supports {ENDPOINT}.",
                      param="endpoint")
    if data.get("completion_window") != "24h":
        return _error(400, "Invalid value for 'completion_window': only '24h' is supported.",
                      param="completion_window")
    file_id = data.get("input_file_id")
    stored = registry.get_file(file_id) if isinstance(file_id, str) else None
    if stored is None:
        return _error(400, f"Invalid 'input_file_id': {file_id!r} does not exist.",
                      param="input_file_id")
    settings = registry.engine.config.batch
    items, errors = _validate(stored.content, settings.openai_max_requests)
    job = BatchJob(api="openai", id=new_id("batch_"), created_at=time.time(),
                   delay_s=settings.delay_s, items=items,
                   limit=registry.expiry_limit(len(items)),
                   input_file_id=stored.id, metadata=data.get("metadata"), errors=errors)
    registry.start(job, lambda cid, payload: _compute(registry, cid, payload),
                   lambda j: _finish(registry, j))
    return json_reply(200, batch_object(registry, job))


def _validate(content: bytes, max_requests: int) -> tuple[list[tuple[str, Any]],
                                                           list[dict[str, Any]]]:
    """The input file's lines, or the validation errors that fail the batch."""
    items: list[tuple[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()

    def bad(code: str, message: str, line: int, param: str | None = None) -> None:
        if len(errors) < 100:
            errors.append({"code": code, "message": message, "param": param, "line": line})

    lines = [raw for raw in content.splitlines() if raw.strip()]
    if not lines:
        bad("empty_file", "The batch input file is empty.", 0)
    if len(lines) > max_requests:
        bad("too_many_requests", f"The batch input file has {len(lines)} requests; the "
            f"maximum is {max_requests}.", len(lines))
        return [], errors
    for number, raw in enumerate(lines, start=1):
        try:
            line = json.loads(raw)
        except ValueError:
            bad("invalid_json_line", "This line is not valid JSON.", number)
            continue
        if not isinstance(line, dict):
            bad("invalid_json_line", "Each line must be a JSON object.", number)
            continue
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            bad("missing_required_parameter", "Missing 'custom_id'.", number, "custom_id")
            continue
        if custom_id in seen:
            bad("duplicate_custom_id", f"The custom_id {custom_id!r} is not unique.", number,
                "custom_id")
            continue
        seen.add(custom_id)
        if line.get("method") != "POST":
            bad("invalid_method", "'method' must be 'POST'.", number, "method")
        elif line.get("url") != ENDPOINT:
            bad("invalid_url", f"'url' must be {ENDPOINT!r}, the batch's endpoint.", number,
                "url")
        elif not isinstance(line.get("body"), dict):
            bad("missing_required_parameter", "'body' must be an object.", number, "body")
        elif items and line["body"].get("model") != items[0][1].get("model"):
            bad("model_mismatch", "All requests of a batch must use the same model.", number,
                "body.model")
        else:
            items.append((custom_id, line["body"]))
    return items, errors


def _compute(registry: BatchRegistry, custom_id: str, body: Any) -> dict[str, Any]:
    """One request through the synchronous engine; the reply becomes a result line."""
    reply, payload = run_request(
        registry, _PROTOCOL, "openai_batch", body,
        {"error": {"message": "The server had an error processing this request.",
                   "type": "server_error", "param": None, "code": None}})
    return {"id": new_id("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": reply.status,
                         "request_id": reply.headers.get("x-request-id", ""),
                         "body": payload},
            "error": None}


_NOT_RUN = {
    "expired": ("batch_expired",
                "This request could not be executed before the completion window expired."),
    "cancelled": ("batch_cancelled", "This request was cancelled before it was executed."),
}


def _finish(registry: BatchRegistry, job: BatchJob) -> None:
    """Write the output and error files (reversed: clients must map by custom_id)."""
    if job.errors:
        return
    with registry.lock:
        results = dict(job.results)
    ok = [r for r in results.values() if r["response"]["status_code"] == 200]
    failed = [r for r in results.values() if r["response"]["status_code"] != 200]
    how = "cancelled" if job.cancel.is_set() else "expired"
    code, message = _NOT_RUN[how]
    failed += [{"id": new_id("batch_req_"), "custom_id": cid, "response": None,
                "error": {"code": code, "message": message}}
               for cid, _ in job.items if cid not in results]
    if ok:
        job.output_file_id = registry.add_file(f"{job.id}_output.jsonl", "batch_output",
                                               jsonl(ok[::-1])).id
    if failed:
        job.error_file_id = registry.add_file(f"{job.id}_error.jsonl", "batch_output",
                                              jsonl(failed[::-1])).id


def batch_object(registry: BatchRegistry, job: BatchJob) -> dict[str, Any]:
    """The documented Batch object, derived from the job's timestamps."""
    with registry.lock:
        done = list(job.results.values())
        ended_as, ended_at = job.ended_as, job.ended_at
    if ended_as is not None:
        status = ended_as
    elif job.cancel_at is not None:
        status = "cancelling"
    elif job.finalizing_at is not None:
        status = "finalizing"
    elif job.in_progress_at is not None:
        status = "in_progress"
    else:
        status = "validating"
    completed = sum(1 for r in done if r["response"]["status_code"] == 200)
    failed = len(done) - completed
    if ended_as in ("expired", "cancelled"):
        failed += len(job.items) - len(done)

    def ts(value: float | None) -> int | None:
        return None if value is None else int(value)

    return {
        "id": job.id, "object": "batch", "endpoint": ENDPOINT,
        "errors": {"object": "list", "data": job.errors} if job.errors else None,
        "input_file_id": job.input_file_id, "completion_window": "24h", "status": status,
        "output_file_id": job.output_file_id if ended_as else None,
        "error_file_id": job.error_file_id if ended_as else None,
        "created_at": ts(job.created_at), "in_progress_at": ts(job.in_progress_at),
        "expires_at": ts(job.expires_at), "finalizing_at": ts(job.finalizing_at),
        "completed_at": ts(ended_at) if ended_as == "completed" else None,
        "failed_at": ts(ended_at) if ended_as == "failed" else None,
        "expired_at": ts(ended_at) if ended_as == "expired" else None,
        "cancelling_at": ts(job.cancel_at),
        "cancelled_at": ts(ended_at) if ended_as == "cancelled" else None,
        "request_counts": {"total": len(job.items), "completed": completed, "failed": failed},
        "metadata": job.metadata,
    }
