"""Simulated provider batch APIs: the shared job lifecycle, files and routing.

Why in the simulator: a batch pipeline has to survive what real batch APIs do (hours of
``in_progress``, expiry with part of the work undone, cancel, per-line errors, limits),
and none of that can be tested against a real provider in seconds. Both APIs run their
requests through the same :class:`SimEngine` as synchronous calls, so a batch answer and
its usage are exactly what the synchronous endpoint would have returned.

The life of a job (times are fractions of ``[simulator.batch] delay_s``):
``0``-``0.1`` validating, then the requests are computed (stopping early on cancel or
at the ``expire_fraction``), ``until 1.0`` in progress, ``1.0``-``1.1`` finalizing, then
ended (completed / expired / cancelled / failed). Each API maps these timestamps to its
own statuses (``batch_openai.py``, ``batch_anthropic.py``).
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from batchroute.sim.engine import SimEngine
from batchroute.sim.protocols import AnthropicProtocol, ApiError, OpenAIProtocol, Reply

log = structlog.get_logger(__name__)

#: custom_id -> one result, in the API's own shape (kept as dicts until rendered).
Results = dict[str, dict[str, Any]]
Compute = Callable[[str, Any], dict[str, Any]]


@dataclass
class BatchJob:
    """One provider batch. Timestamps are unix seconds, None until the step happens."""

    api: str  # "openai" | "anthropic"
    id: str
    created_at: float
    delay_s: float
    items: list[tuple[str, Any]]  # (custom_id, request body / params) in input order
    limit: int  # how many items get processed before the job expires (expiry switch)
    input_file_id: str | None = None
    metadata: Any = None
    errors: list[dict[str, Any]] = field(default_factory=list)  # validation (OpenAI)
    results: Results = field(default_factory=dict)
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    cancel_at: float | None = None
    ended_at: float | None = None
    ended_as: str | None = None  # "completed" | "expired" | "cancelled" | "failed"
    output_file_id: str | None = None
    error_file_id: str | None = None
    result_file: bytes = b""  # Anthropic's results JSONL, written when the job ends
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def expires_at(self) -> float:
        return self.created_at + 24 * 3600  # the documented 24 h completion window


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int


class BatchRegistry:
    """Files and batch jobs of one simulated provider, shared by both APIs (thread-safe).

    Lives on the SimServer, not the HTTP server, so a provider "restart" (stop/start)
    keeps its batches, as a real provider does across an outage."""

    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.files: dict[str, StoredFile] = {}
        self.jobs: dict[str, BatchJob] = {}
        self.created = 0

    def add_file(self, filename: str, purpose: str, content: bytes) -> StoredFile:
        stored = StoredFile(f"file-{uuid.uuid4().hex[:24]}", filename, purpose, content,
                            int(time.time()))
        with self.lock:
            self.files[stored.id] = stored
        return stored

    def get_file(self, file_id: str) -> StoredFile | None:
        with self.lock:
            return self.files.get(file_id)

    def expiry_limit(self, count: int) -> int:
        """How many of a new job's ``count`` requests get processed before it expires:
        ``expire_fraction`` applies to every job, or only to the first ``expire_batches``
        jobs created (so a test can expire exactly one provider batch)."""
        settings = self.engine.config.batch
        with self.lock:
            self.created += 1
            nth = self.created
        if settings.expire_batches is not None and nth > settings.expire_batches:
            return count
        return processed_limit(count, settings.expire_fraction)

    def all_jobs(self, api: str) -> list[BatchJob]:
        """Every job of the API, newest first (tests and benchmarks look at all of them)."""
        with self.lock:
            jobs = [j for j in self.jobs.values() if j.api == api]
        return sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)

    def listing(self, api: str, query: dict[str, str] | None = None,
                ) -> tuple[list[BatchJob], bool]:
        """(a page of the API's jobs, newest first; whether older ones follow), as the list
        endpoints page: ``limit`` (1-100, default 20 as both APIs), and a cursor,
        ``after`` (OpenAI) or ``after_id`` (Anthropic): the jobs older than that one."""
        query = query or {}
        try:
            limit = min(100, max(1, int(query.get("limit", "20"))))
        except ValueError:
            limit = 20
        jobs = self.all_jobs(api)  # the id breaks ties between jobs created together
        cursor = query.get("after") or query.get("after_id")
        if cursor:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(cursor) + 1:] if cursor in ids else []
        return jobs[:limit], len(jobs) > limit

    def get_job(self, api: str, job_id: str) -> BatchJob | None:
        with self.lock:
            job = self.jobs.get(job_id)
        return job if job is not None and job.api == api else None

    def start(self, job: BatchJob, compute: Compute,
              finish: Callable[[BatchJob], None]) -> None:
        """Register the job and run it in a daemon thread (the sim never waits for it)."""
        with self.lock:
            self.jobs[job.id] = job
        threading.Thread(target=self._run, args=(job, compute, finish), daemon=True,
                         name=f"sim-batch-{job.id}").start()

    @staticmethod
    def _sleep_until(job: BatchJob, at: float) -> None:
        """Sleep until ``at``; a cancel wakes the job up early. A server stop does not:
        a real provider keeps working on batches while a client cannot reach it."""
        if (left := at - time.time()) > 0:
            job.cancel.wait(left)

    def _run(self, job: BatchJob, compute: Compute,
             finish: Callable[[BatchJob], None]) -> None:
        try:
            self._sleep_until(job, job.created_at + 0.1 * job.delay_s)
            if job.errors:
                self._end(job, "failed", finish)
                return
            job.in_progress_at = time.time()
            for count, (custom_id, payload) in enumerate(job.items):
                if job.cancel.is_set() or count >= job.limit:
                    break
                result = compute(custom_id, payload)
                with self.lock:
                    job.results[custom_id] = result
            self._sleep_until(job, job.created_at + job.delay_s)
            if job.cancel.is_set():
                self._end(job, "cancelled", finish)
                return
            job.finalizing_at = time.time()
            self._sleep_until(job, job.created_at + 1.1 * job.delay_s)
            unfinished = len(job.results) < len(job.items)
            self._end(job, "expired" if unfinished and not job.cancel.is_set()
                      else "cancelled" if job.cancel.is_set() else "completed", finish)
        except Exception:  # a sim bug must not leave a job "in progress" forever
            log.exception("sim.batch_internal_error", batch=job.id)
            job.errors.append({"code": "server_error", "message": "simulator internal error",
                               "param": None, "line": None})
            self._end(job, "failed", finish)

    def _end(self, job: BatchJob, how: str, finish: Callable[[BatchJob], None]) -> None:
        finish(job)  # writes the API's result files before the job is seen as ended
        with self.lock:
            job.ended_as = how
            job.ended_at = time.time()
        job.done.set()

    def request_cancel(self, job: BatchJob) -> bool:
        """False when the job already ended (nothing left to cancel)."""
        with self.lock:
            if job.ended_at is not None:
                return False
            if job.cancel_at is None:
                job.cancel_at = time.time()
        job.cancel.set()
        return True


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n"
                    for line in lines)


def processed_limit(count: int, expire_fraction: float | None) -> int:
    """How many requests a job processes before it expires (all of them if never)."""
    if expire_fraction is None:
        return count
    return min(count, int(count * expire_fraction))


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """``multipart/form-data`` fields as name -> (filename, bytes), via the stdlib email
    parser (the sim has no third-party dependencies)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, tuple[str | None, bytes]] = {}
    if not message.is_multipart():
        return fields
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        fields[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return fields


def route(registry: BatchRegistry, method: str, path: str, body: bytes,
          headers: dict[str, str], query: dict[str, str] | None = None) -> Reply | None:
    """The batch endpoints of both APIs, or None when ``path`` is none of them."""
    from batchroute.sim import batch_anthropic, batch_openai

    if path.startswith("/v1/messages/batches"):
        return batch_anthropic.handle(registry, method, path, body, headers, query or {})
    if path.startswith(("/v1/files", "/v1/batches")):
        return batch_openai.handle(registry, method, path, body, headers, query or {})
    return None


def is_batch_path(path: str) -> bool:
    """Batch uploads may exceed the synchronous body limit (up to 256 MB)."""
    return path.startswith(("/v1/messages/batches", "/v1/files", "/v1/batches"))


def run_request(registry: BatchRegistry, protocol: OpenAIProtocol | AnthropicProtocol,
                counter: str, body: Any, server_error: dict[str, Any]) -> tuple[Reply, Any]:
    """One request of a batch through the synchronous engine (the same answers and usage a
    synchronous call gets): its reply and the reply's JSON. An injected "malformed" fault
    is the provider's side failing: a 500 with the API's own `server_error` body."""
    engine = registry.engine
    model = body.get("model") if isinstance(body.get("model"), str) else None
    try:
        request = protocol.parse(body, {})
    except ApiError as e:
        reply = protocol.error(e.status, e.kind, e.message, e.param)
    else:
        reply = protocol.render(engine.complete(request, batch=True), request)
    engine.count_request(counter, model)
    engine.count_response(reply.status)
    try:
        payload = json.loads(reply.body)
    except ValueError:
        reply.status = 500
        payload = server_error
    return reply, payload
