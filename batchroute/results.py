"""Writing results in the OpenAI Batch output format, plus what batchroute knows.

Files are written to a temporary name and renamed, so a reader never sees half
a results file. Jobs are streamed from the store in input order.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from batchroute.secrets import redact, redact_obj
from batchroute.store import FINISHED, SUCCEEDED, Store


@dataclass
class WriteSummary:
    written: int = 0
    errors: int = 0
    unfinished: int = 0


@contextmanager
def atomic_writer(path: Path) -> Iterator[IO[str]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
        # mkstemp creates 0600; results are ordinary files, readable as the umask allows.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class OutputJob(Protocol):
    """What an output line reads of a job: a `Job`, or a row of `Store.output_rows`."""

    @property
    def id(self) -> str: ...
    @property
    def custom_id(self) -> str: ...
    @property
    def task(self) -> str: ...
    @property
    def tier(self) -> int: ...
    @property
    def provider(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def escalations(self) -> list[dict[str, Any]]: ...
    @property
    def verdicts(self) -> list[dict[str, Any]]: ...
    @property
    def reference_model(self) -> str | None: ...
    @property
    def options(self) -> dict[str, Any]: ...
    @property
    def state(self) -> str: ...
    @property
    def result(self) -> dict[str, Any] | None: ...
    @property
    def error(self) -> dict[str, Any] | None: ...


def output_line(job: OutputJob, n_attempts: int, cost: float, request_id: str = "",
                ) -> dict[str, Any]:
    """One line of OpenAI's batch output format. ``response.request_id`` is the provider's
    request id of the final call (its ``x-request-id``), as in OpenAI's own output; a job
    that failed on a provider's HTTP error gets the provider's status code and error body
    in ``response``, next to batchroute's own ``error.code``."""
    meta = {"task": job.task, "tier": job.tier, "provider": job.provider, "model": job.model,
            "attempts": n_attempts, "cost_usd": round(cost, 8), "escalations": job.escalations,
            "validators": job.verdicts, "reference_model": job.reference_model,
            "reused_from": _reused_from(job)}
    if "batch_unanswered" in (job.options or {}):  # a provider batch left it unanswered
        meta["provider_batch"] = {"unanswered": job.options["batch_unanswered"],
                                  "expiries": job.options.get("batch_expiries", 0),
                                  "sent_synchronously": bool(job.options.get("sync"))}
    line: dict[str, Any] = {"id": f"batch_req_{job.id}", "custom_id": job.custom_id}
    if job.state == SUCCEEDED and job.result is not None:
        line["response"] = {"status_code": 200,
                            "request_id": request_id or str(job.result.get("id", "")),
                            "body": job.result}
        line["error"] = None
    else:
        # Redacted again on the way out: an error stored before keys were redacted.
        error = dict(redact_obj(job.error) or {"code": job.state,
                                               "message": f"job is {job.state}"})
        line["response"] = error.pop("provider_response", None)
        line["error"] = error
    line["batchroute"] = meta
    return line


def _reused_from(job: OutputJob) -> dict[str, Any] | None:
    """Whose answer a reused job copied (batchroute.reuse_run): that job's custom_id and
    batch id; None when the job's answer was its own."""
    info = (job.options or {}).get("reused_from")
    if not isinstance(info, dict):
        return None
    return {"custom_id": info.get("custom_id"), "batch_id": info.get("batch_id")}


def same_file(a: Path, b: Path) -> bool:
    """`a.jsonl`, `./a.jsonl`, an absolute path or a link to it: one file. Two atomic
    writers on one path would each rename over the other, and one half would vanish."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def write_results(store: Store, batch_id: str, out: Path, errors: Path | None = None,
                  ) -> WriteSummary:
    """Succeeded jobs to `out`; failed jobs and bad input lines to `errors` (or `out` if None,
    or if `errors` is the same file as `out`: both kinds then go into that one file)."""
    if errors is not None and same_file(out, errors):
        errors = None
    per_job: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    request_ids: dict[str, str] = {}  # the last call's: the one whose answer is the result
    for a in store.attempt_rows(batch_id):
        per_job[a.job_id][0] += 1
        per_job[a.job_id][1] += a.cost_usd
        if a.request_id:
            request_ids[a.job_id] = a.request_id
    summary = WriteSummary()
    with ExitStack() as stack:
        fout = stack.enter_context(atomic_writer(out))
        ferr = stack.enter_context(atomic_writer(errors)) if errors is not None else fout
        for job in store.output_rows(batch_id):
            if job.state not in FINISHED:  # cancelled jobs go to errors, code "cancelled"
                summary.unfinished += 1
                continue
            n, cost = per_job.get(job.id, (0, 0.0))
            line = output_line(job, int(n), cost, request_ids.get(job.id, ""))
            target = fout if job.state == SUCCEEDED else ferr
            target.write(json.dumps(line, ensure_ascii=False) + "\n")
            summary.written += job.state == SUCCEEDED
            summary.errors += job.state != SUCCEEDED
        for le in store.iter_line_errors(batch_id):
            ferr.write(json.dumps({
                "id": None, "custom_id": le.custom_id, "response": None,
                "error": {"code": "invalid_line",
                          "message": redact(f"line {le.line_no}: {le.reason}"),
                          "line": le.line_no}}) + "\n")
            summary.errors += 1
    return summary
