"""Ingestion: stream a JSONL batch into the store and onto the queues.

The file is read line by line (never whole, and never more than the line cap of
one line: a 50 MB line is skipped, not loaded), jobs are inserted and published
in chunks, and a bad line is recorded with its number and reason while the good
lines go on. With `strict`, the whole file is checked first and refused on its
first bad line, before anything is stored. The batch id is a hash of the file's
bytes, so submitting the same file twice finds the same batch and duplicates
nothing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from batchroute.adaptive import ingest_start
from batchroute.chunkpool import OrderedPool, default_workers
from batchroute.config import Config
from batchroute.dispatch import Dispatcher
from batchroute.jobspec import MAX_CUSTOM_ID, JobSpec, LineProblem, parse_line
from batchroute.reuse import ReuseSettings, reuse_key, settings_for
from batchroute.router import RouteError, pick_model, route
from batchroute.store import QUEUED, Store, utcnow
from batchroute.store.bulk import JobLoader, encode_job, finish_encode, pre_encode
from batchroute.tokens import count_messages

log = structlog.get_logger("batchroute.ingest")
CHUNK = 2000  # lines per transaction and per broker pipeline
# A chunk also closes at this many bytes of lines: 2000 lines just under the line cap
# would otherwise be 16 GB in one chunk (and `ahead` chunks are in flight at once).
CHUNK_BYTES = 4 * 1024 * 1024
# Bad lines logged one by one (the CLI prints the same first ones); the rest are only
# counted, so a file of a million bad lines never means a million log lines.
LOGGED_BAD_LINES = 20
KEPT_PROBLEMS = 1000  # (line_no, reason) kept in memory for the caller to print
MAX_REASON = 1000  # characters of a bad line's reason stored (reasons quote user values)
PARALLEL_MIN_BYTES = 4 * 1024 * 1024  # smaller files parse in-process
HUGE_LINES_PER_MB = 16  # fewer lines than this in the first MB: parse in-process
DEFAULT_MAX_LINE_BYTES = 8 * 1024 * 1024


def max_line_bytes() -> int:
    """The longest line read (BATCHROUTE_MAX_LINE_BYTES, default 8 MB): a request larger than
    this is beyond every model's context window anyway, and reading it whole would let one
    line exhaust a worker's memory."""
    return int(os.environ.get("BATCHROUTE_MAX_LINE_BYTES") or DEFAULT_MAX_LINE_BYTES)


class BatchInputError(ValueError):
    """The file as a whole cannot be taken (empty, not UTF-8, or --strict and a bad line);
    str() is the message for the user. Nothing has been stored when it is raised."""


class StrictError(BatchInputError):
    def __init__(self, path: Path, line_no: int, reason: str) -> None:
        super().__init__(f"{path.name} line {line_no}: {reason} (--strict: the file was "
                         "refused, nothing was stored or enqueued)")
        self.line_no, self.reason = line_no, reason


_REFUSED_PREFIXES = (
    (b"\xff\xfe", "is UTF-16 encoded"), (b"\xfe\xff", "is UTF-16 encoded"),
    (b"\x1f\x8b", "is gzip-compressed: decompress it first;"),
    (b"PK\x03\x04", "is a zip archive: extract it first;"),
)


def check_file(path: Path) -> None:
    """Refuse files no line of which can be read, with one clear message instead of a
    per-line error on every line."""
    with path.open("rb") as f:
        head = f.read(4)
        for prefix, what in _REFUSED_PREFIXES:
            if head.startswith(prefix):
                raise BatchInputError(f"{path.name} {what} batch files must be UTF-8 JSONL "
                                      "(one JSON object per line)")
        f.seek(0)
        for block in iter(lambda: f.read(1 << 16), b""):
            if block.replace(b"\xef\xbb\xbf", b"").strip():
                return
    raise BatchInputError(f"{path.name} is empty: no request lines, nothing to run")


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


def count_lines(path: Path) -> int:
    """Lines in a file, for a progress bar's total (blank lines count here but are never
    reported as progress, so such a bar ends that many short), read a megabyte at a time."""
    n, last = 0, b"\n"
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def job_id(batch_id: str, custom_id: str) -> str:
    return "j" + hashlib.sha256(f"{batch_id}\0{custom_id}".encode()).hexdigest()[:23]


def job_row(config: Config, batch_id: str, spec: JobSpec, line_no: int,
            reuse: ReuseSettings | None = None) -> dict[str, Any]:
    """Route a parsed line and turn it into a Job row (raises RouteError). `reuse`: the
    batch's answer-reuse settings (None: the config's default mode)."""
    tokens = count_messages(spec.body["messages"])
    r = route(config, spec, tokens)
    model = pick_model(config, r.start_tier, spec.pin)
    if model is None:  # pragma: no cover - route() only keeps tiers that have models
        raise RouteError(f"no model serves tier {r.start_tier}")
    now = utcnow()
    options = spec.options
    key = reuse_key(spec.body, options, spec.task, config.task(spec.task),
                    reuse or settings_for(config))
    return {
        "id": job_id(batch_id, spec.custom_id), "batch_id": batch_id,
        "custom_id": spec.custom_id, "line_no": line_no, "task": spec.task, "body": spec.body,
        "options": options | {"route_reason": r.reason}, "reuse_key": key,
        "reference_model": r.reference_model, "ladder": list(r.ladder),
        "tier_index": r.start_index, "tier": model.tier, "model": model.name,
        "provider": model.provider, "state": QUEUED, "attempt_no": 1,
        "prompt_tokens_est": tokens, "escalations": [], "verdicts": [], "result": None,
        "error": None, "created_at": now, "updated_at": now, "finished_at": None,
    }


def _lines(path: Path, max_bytes: int | None = None) -> Iterator[tuple[int, bytes | LineProblem]]:
    """(line number, bytes) of each non-blank line; a line over the cap yields a LineProblem
    instead, and only the cap's worth of it is ever in memory."""
    cap = max_bytes or max_line_bytes()
    with path.open("rb") as f:
        n = 0
        while raw := f.readline(cap + 1):
            n += 1
            if len(raw) > cap and not (len(raw) == cap + 1 and raw.endswith(b"\n")):
                while not raw.endswith(b"\n"):  # skip the rest of the line, a block at a time
                    raw = f.readline(1 << 20)
                    if not raw:
                        break
                yield n, LineProblem(f"longer than {cap / 2**20:g} MB (the line limit, "
                                     "BATCHROUTE_MAX_LINE_BYTES); split or shorten the request")
            elif raw.strip():
                yield n, raw


def _parse(config: Config, batch_id: str, line_no: int, raw: bytes | str | LineProblem,
           seen: set[str], reuse: ReuseSettings | None = None) -> dict[str, Any]:
    """One line to a Job row, or LineProblem/RouteError naming what is wrong."""
    if isinstance(raw, LineProblem):
        raise raw
    spec = parse_line(raw, line_no, config)
    if spec.custom_id in seen:
        raise LineProblem(f"custom_id: duplicate {spec.custom_id!r} (custom_id must be "
                          "unique within a batch)", spec.custom_id)
    seen.add(spec.custom_id)
    return job_row(config, batch_id, spec, line_no, reuse)


def check_lines(config: Config, path: Path) -> int:
    """--strict: parse and route every line without storing anything; raise StrictError on
    the first bad one. Returns the number of lines."""
    seen: set[str] = set()
    count = 0
    reuse = settings_for(config)
    for line_no, raw in _lines(path):
        count += 1
        try:
            _parse(config, "strict-check", line_no, raw, seen, reuse)
        except (LineProblem, RouteError) as e:
            raise StrictError(path, line_no, str(e)) from None
    return count


# One parsed line. A job: ("j", line_no, custom_id, job id, provider, payload), the payload
# being the row, or its COPY text when the parser encodes it. A rejected line:
# ("p", line_no, custom_id for the LineError row, reason, custom_id the line still claims,
# as a parsed line that could not be routed does).
_Entry = tuple[Any, ...]


def _parse_chunk(state: tuple[Config, str, str, ReuseSettings],
                 chunk: list[tuple[int, bytes | str | LineProblem]]) -> list[_Entry]:
    """Parse and route a chunk of lines; runs in a parser process (or in-process).
    `encode`: "copy" turns rows into COPY text, "pre" all but the columns the adaptive
    cascade may still change (store.bulk.pre_encode), "" leaves them as dicts."""
    config, batch_id, encode, reuse = state
    out: list[_Entry] = []
    for line_no, raw in chunk:
        try:
            if isinstance(raw, LineProblem):
                raise raw
            spec = parse_line(raw, line_no, config)
        except LineProblem as e:
            out.append(("p", line_no, e.custom_id, str(e), None))
            continue
        try:
            row = job_row(config, batch_id, spec, line_no, reuse)
        except RouteError as e:
            out.append(("p", line_no, getattr(e, "custom_id", None), str(e), spec.custom_id))
            continue
        out.append(("j", line_no, spec.custom_id, row["id"], row["provider"],
                    encode_job(row) if encode == "copy" else
                    pre_encode(row) if encode == "pre" else row))
    return out


def _chunks(lines: Iterable[tuple[int, bytes | str | LineProblem]], size: int,
            max_bytes: int = CHUNK_BYTES,
            ) -> Iterator[list[tuple[int, bytes | str | LineProblem]]]:
    """Chunks of at most `size` lines and (past their first line) `max_bytes` bytes."""
    chunk: list[tuple[int, bytes | str | LineProblem]] = []
    nbytes = 0
    for item in lines:
        chunk.append(item)
        raw = item[1]
        nbytes += len(raw) if isinstance(raw, bytes | str) else 0
        if len(chunk) >= size or nbytes >= max_bytes:
            yield chunk
            chunk = []
            nbytes = 0
    if chunk:
        yield chunk


def storable(text: str | None, limit: int) -> str | None:
    """A value from a bad line made safe to store: NUL characters (which PostgreSQL
    refuses, aborting the whole chunk) escaped, and at most `limit` characters."""
    if text is None:
        return None
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def ingest_lines(config: Config, store: Store, dispatcher: Dispatcher | None, batch_id: str,
                 lines: Iterable[tuple[int, bytes | str | LineProblem]],
                 progress: Callable[[int], None] | None = None,
                 workers: int = 0, reuse_mode: str | None = None) -> IngestResult:
    """Parse, store and publish a chunk at a time; `dispatcher=None` stores without publishing.

    With `workers` > 0, that many forked processes parse ahead while this one stores
    (COPY on PostgreSQL, batchroute.store.bulk) and publishes (one Redis pipeline per
    chunk, batchroute.publish). Duplicate custom_ids are judged here, in line order, so
    the first occurrence wins whatever the number of workers. Only rows that were new are
    published with their first attempt; rows already stored (the same file submitted
    again) are published again only if still queued, which duplicates nothing: a worker
    must claim (job, attempt) before it runs it. `reuse_mode`: "auto", "on" or "off"
    (batchroute.reuse; None: the config's), fixed in each job's reuse key.
    """
    result = IngestResult(batch_id=batch_id)
    seen: set[str] = set()
    start = ingest_start(config, store)  # the adaptive cascade's start tiers (None: off)
    loader = JobLoader(store.engine)
    # Rows are encoded where they are parsed, in parallel; with the cascade on, all but the
    # few small columns it may still change (its start tiers need this process's store).
    encode_early = loader.encoded and start is None
    encode = "copy" if encode_early else "pre" if loader.encoded else ""

    def store_chunk(entries: list[_Entry]) -> None:
        rows: list[Any] = []
        problems: list[dict[str, Any]] = []
        for entry in entries:
            result.lines += 1
            if entry[0] == "j":
                _, line_no, cid, _, _, payload = entry
                if cid not in seen:
                    seen.add(cid)
                    rows.append(entry)
                    continue
                row_cid, reason = cid, (f"custom_id: duplicate {cid!r} (custom_id must be "
                                        "unique within a batch)")
            else:
                _, line_no, row_cid, reason, claimed = entry
                if claimed is not None:
                    seen.add(claimed)
            reason = storable(reason, MAX_REASON) or ""
            result.problem_count += 1
            if len(result.problems) < KEPT_PROBLEMS:
                result.problems.append((line_no, reason))
            problems.append({"batch_id": batch_id, "line_no": line_no,
                             "custom_id": storable(row_cid, MAX_CUSTOM_ID), "reason": reason})
            if result.problem_count <= LOGGED_BAD_LINES:
                # info, below the CLI's WARNING: the CLI prints these lines itself, once.
                log.info("bad_line", batch_id=batch_id, line=line_no, reason=reason)
        fresh = [(e[3], e[4]) for e in rows]  # (job id, provider)
        payloads = [e[5] for e in rows]
        if start is not None:
            movable = [p[1] for p in payloads] if encode == "pre" else payloads
            start.apply(movable)
            fresh = [(r["id"], r["provider"]) for r in movable]
            if encode == "pre":
                payloads = [finish_encode(p) for p in payloads]
        new = loader.insert(payloads)
        store.insert_line_errors(problems)
        if dispatcher is not None and fresh:
            items = [(i, 1, config.providers[p].queue) for i, p in fresh if i in new]
            stored_before = [i for i, _ in fresh if i not in new]
            if stored_before:
                items += [(i, n, config.providers[p].queue)
                          for i, n, p in store.queued_jobs(batch_id, stored_before)]
            dispatcher.enqueue_many(items)
            result.enqueued += len(items)
        if progress is not None:
            progress(len(entries))

    reuse = settings_for(config, reuse_mode)
    with OrderedPool(_parse_chunk, (config, batch_id, encode, reuse), workers) as pool:
        for entries in pool.map(_chunks(lines, CHUNK)):
            store_chunk(entries)
    result.jobs = result.lines - result.problem_count
    return result


def ingest_workers(path: Path) -> int:
    """Parser processes for a file: BATCHROUTE_INGEST_WORKERS if set (0: parse in-process),
    else none below PARALLEL_MIN_BYTES (forking costs more than it saves on a small file)
    or when the first megabyte holds fewer than HUGE_LINES_PER_MB lines (memory), and one
    per CPU, at most 4, otherwise."""
    env = os.environ.get("BATCHROUTE_INGEST_WORKERS")
    if env:
        return max(0, int(env))
    if path.stat().st_size < PARALLEL_MIN_BYTES:
        return 0
    with path.open("rb") as f:
        if f.read(1 << 20).count(b"\n") < HUGE_LINES_PER_MB:
            # Lines of megabytes: each parser process would hold several of them (and its
            # copy of this process's heap) at once; ~+120 MB for lines near the cap.
            return 0
    return default_workers()


def ingest_file(config: Config, store: Store, dispatcher: Dispatcher | None, path: Path,
                name: str | None = None,
                progress: Callable[[int], None] | None = None,
                strict: bool = False, budget_usd: float | None = None,
                deadline_s: float | None = None, reuse_mode: str | None = None,
                provider_batch: bool | None = None) -> IngestResult:
    """Store (and publish) a file's jobs; raises BatchInputError, before storing anything,
    for a file that cannot be taken at all (or, with `strict`, has any bad line).
    `reuse_mode` applies to new jobs only: a file submitted again keeps its stored keys."""
    check_file(path)
    if strict:
        check_lines(config, path)
    batch_id = file_batch_id(path)
    store.ensure_batch(batch_id, name or path.name, str(path), budget_usd, deadline_s,
                       provider_batch)
    result = ingest_lines(config, store, dispatcher, batch_id, _lines(path), progress,
                          workers=ingest_workers(path), reuse_mode=reuse_mode)
    store.update_batch(batch_id, total_lines=result.lines, error_lines=result.problem_count,
                       state="running")
    log.info("batch_ingested", batch_id=batch_id, lines=result.lines, jobs=result.jobs,
             bad_lines=result.problem_count, enqueued=result.enqueued,
             bad_lines_logged=min(result.problem_count, LOGGED_BAD_LINES))
    return result
