"""Ingestion: stream a JSONL batch into the store and onto the queues.

The file is read line by line (never whole), jobs are inserted and published in
chunks, and a bad line is recorded with its number and reason while the good
lines go on. The batch id is a hash of the file's bytes, so submitting the
same file twice finds the same batch and duplicates nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from batchroute.config import Config
from batchroute.dispatch import Dispatcher
from batchroute.jobspec import JobSpec, LineProblem, parse_line
from batchroute.router import RouteError, pick_model, route
from batchroute.store import QUEUED, Store, utcnow
from batchroute.tokens import count_messages

log = structlog.get_logger("batchroute.ingest")
CHUNK = 1000


@dataclass
class IngestResult:
    batch_id: str
    lines: int = 0
    jobs: int = 0
    enqueued: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line_no, reason), first 1000
    problem_count: int = 0


def file_batch_id(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "b" + digest.hexdigest()[:15]


def job_id(batch_id: str, custom_id: str) -> str:
    return "j" + hashlib.sha256(f"{batch_id}\0{custom_id}".encode()).hexdigest()[:23]


def job_row(config: Config, batch_id: str, spec: JobSpec, line_no: int) -> dict[str, Any]:
    """Route a parsed line and turn it into a Job row (raises RouteError)."""
    tokens = count_messages(spec.body["messages"])
    r = route(config, spec, tokens)
    model = pick_model(config, r.start_tier, spec.pin)
    if model is None:  # pragma: no cover - route() only keeps tiers that have models
        raise RouteError(f"no model serves tier {r.start_tier}")
    now = utcnow()
    return {
        "id": job_id(batch_id, spec.custom_id), "batch_id": batch_id,
        "custom_id": spec.custom_id, "line_no": line_no, "task": spec.task, "body": spec.body,
        "options": spec.options | {"route_reason": r.reason},
        "reference_model": r.reference_model, "ladder": list(r.ladder),
        "tier_index": r.start_index, "tier": model.tier, "model": model.name,
        "provider": model.provider, "state": QUEUED, "attempt_no": 1,
        "prompt_tokens_est": tokens, "escalations": [], "verdicts": [], "result": None,
        "error": None, "created_at": now, "updated_at": now, "finished_at": None,
    }


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if raw.strip():
                yield n, raw


def ingest_lines(config: Config, store: Store, dispatcher: Dispatcher | None, batch_id: str,
                 lines: Iterable[tuple[int, bytes | str]],
                 progress: Callable[[int], None] | None = None) -> IngestResult:
    """Parse, store and publish; `dispatcher=None` stores without publishing."""
    result = IngestResult(batch_id=batch_id)
    rows: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()

    def flush() -> None:
        store.insert_jobs(rows)
        store.insert_line_errors(problems)
        if dispatcher is not None and rows:
            queued = store.queued_jobs(batch_id, [r["id"] for r in rows])
            dispatcher.enqueue_many([(i, n, config.providers[p].queue) for i, n, p in queued])
            result.enqueued += len(queued)
        if progress is not None:
            progress(len(rows) + len(problems))
        rows.clear()
        problems.clear()

    for line_no, raw in lines:
        result.lines += 1
        try:
            spec = parse_line(raw, line_no, config)
            if spec.custom_id in seen:
                raise LineProblem(f"custom_id: duplicate {spec.custom_id!r} (custom_id must be "
                                  "unique within a batch)", spec.custom_id)
            seen.add(spec.custom_id)
            rows.append(job_row(config, batch_id, spec, line_no))
        except (LineProblem, RouteError) as e:
            cid = getattr(e, "custom_id", None)
            result.problem_count += 1
            if len(result.problems) < 1000:
                result.problems.append((line_no, str(e)))
            problems.append({"batch_id": batch_id, "line_no": line_no, "custom_id": cid,
                             "reason": str(e)})
            log.warning("bad_line", batch_id=batch_id, line=line_no, reason=str(e))
        if len(rows) + len(problems) >= CHUNK:
            flush()
    flush()
    result.jobs = result.lines - result.problem_count
    return result


def ingest_file(config: Config, store: Store, dispatcher: Dispatcher | None, path: Path,
                name: str | None = None,
                progress: Callable[[int], None] | None = None) -> IngestResult:
    batch_id = file_batch_id(path)
    store.ensure_batch(batch_id, name or path.name, str(path))
    result = ingest_lines(config, store, dispatcher, batch_id, _lines(path), progress)
    store.update_batch(batch_id, total_lines=result.lines, error_lines=result.problem_count,
                       state="running")
    log.info("batch_ingested", batch_id=batch_id, lines=result.lines, jobs=result.jobs,
             bad_lines=result.problem_count, enqueued=result.enqueued)
    return result
