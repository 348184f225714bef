"""`batchroute run`: the whole pipeline in one process.

No Redis and no database server: an SQLite file, a thread pool as broker and
worker, and the simulated provider started in-process (unless the config names
real providers). The job code is the very `pipeline.process_job` the Celery
workers run, so what a user sees here is what the deployment does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchroute.config import Config, check_api_keys, load_config
from batchroute.dispatch import LocalDispatcher
from batchroute.ingest import IngestResult, ingest_file
from batchroute.pipeline import SharedWrites, process_job
from batchroute.provider_batch import runner as batch_api_runner
from batchroute.recovery import reclaim_for_local_run
from batchroute.reports import batch_report
from batchroute.results import WriteSummary, write_results
from batchroute.runtime import Runtime
from batchroute.store import BATCHED, Store

# How often the run loop looks at its provider batches while nothing else runs (each is
# still polled only every [provider_batch] poll_s).
PROVIDER_BATCH_TICK_S = 0.25


@dataclass
class RunOutcome:
    ingest: IngestResult
    written: WriteSummary
    report: dict[str, Any]
    breakers: dict[str, dict[str, Any]]


def run_file(path: Path, out: Path, errors: Path | None = None, config: Config | None = None,
             store: Store | None = None, concurrency: int = 16,
             on_ingested: Callable[[IngestResult], None] | None = None,
             on_progress: Callable[[dict[str, int]], None] | None = None,
             strict: bool = False, budget_usd: float | None = None,
             deadline_s: float | None = None, reuse_mode: str | None = None,
             provider_batch: bool | None = None) -> RunOutcome:
    config = config or load_config()
    check_api_keys(config)
    store = store or Store()
    dispatcher = LocalDispatcher(concurrency=concurrency)
    rt = Runtime(config, store, dispatcher)
    # Finished jobs' moves are written in groups (pipeline.SharedWrites); flushed at every
    # look at the store below and before the results are read.
    writes = SharedWrites(rt)
    dispatcher.handler = lambda job_id, attempt_no: process_job(rt, job_id, attempt_no, writes)
    try:
        ingest = ingest_file(config, store, None, path, strict=strict, budget_usd=budget_usd,
                             deadline_s=deadline_s, reuse_mode=reuse_mode,
                             provider_batch=provider_batch)
        # Nobody else works on this batch: jobs an interrupted run left "running" (and jobs
        # cancelled) run again, at a new attempt number so the ledger keeps the old one.
        reclaim_for_local_run(store, config, ingest.batch_id)
        queued = store.queued_jobs(ingest.batch_id)
        dispatcher.enqueue_many([(i, n, config.providers[p].queue) for i, n, p in queued])
        if on_ingested is not None:
            on_ingested(ingest)
        batch_api = any(config.uses_batch_api(m) for m in config.models.values())
        while True:
            idle = dispatcher.join(timeout=0.25)
            writes.flush()
            counts = (store.state_counts(ingest.batch_id)
                      if batch_api or on_progress is not None else {})
            if on_progress is not None:
                on_progress(counts)
            if counts.get(BATCHED, 0):
                # Jobs wait in provider batches: this loop is their beat.
                batch_api_runner.tick(rt)
                if idle:
                    time.sleep(PROVIDER_BATCH_TICK_S)
            elif idle:
                break
        if dispatcher.errors:
            raise RuntimeError(f"{len(dispatcher.errors)} job(s) crashed; first: "
                               f"{dispatcher.errors[0]!r}") from dispatcher.errors[0]
        if on_progress is not None:
            on_progress(store.state_counts(ingest.batch_id))
        store.update_batch(ingest.batch_id, state="done")
        written = write_results(store, ingest.batch_id, out, errors)
        return RunOutcome(ingest, written, batch_report(store, config, ingest.batch_id),
                          rt.breakers.snapshot())
    finally:
        dispatcher.close()
        with contextlib.suppress(Exception):  # interrupted: keep the jobs that did finish
            writes.flush()
        rt.close()
