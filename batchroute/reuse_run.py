"""Answer reuse in the pipeline: a job whose request was already answered takes that answer.

Runs at the start of a job's first attempt (`pipeline.run_claimed`), before any model is
chosen or budget reserved, for jobs that have a reuse key (`batchroute.reuse`):

1. a job with the same key succeeded, in this batch or an earlier one: copy its answer,
   verdicts, tier and model; record a $0 Attempt with outcome "reused"; the job's
   options keep `reused_from` (the original's batch, custom_id and what it cost), which
   the output line and the report show;
2. else, if another *unfinished* job of this batch with the key comes first (the smallest
   job id among them: every worker computes the same leader without talking to the
   others), wait for it: the job is put back, queued at the same attempt number, and
   re-published with a short delay (backing off to MAX_WAIT_S). When it comes back it
   looks again, and copies the leader's answer once the leader succeeded;
3. else (it is the leader, or a job of the batch with the key has failed: an answer that
   failed once is no reason to keep the others waiting) it runs itself.

Why this is exactly-once safe with several workers: the leader is a function of the
store's state, and a non-leader never calls anyone while its leader is unfinished; if two
workers look at once, both see the same smallest id. A leader that fails, is cancelled or
whose worker dies (the sweeper takes it back, it runs again) never leaves its duplicates
waiting forever: a failed one makes them run, a re-run one is still the leader. Only
jobs of the same batch are waited for: a job of another batch may never run (an
interrupted `run` left it queued in the SQLite file), so across batches only answers that
already succeeded are reused. Every move is the pipeline's guarded transition, so a
duplicated message still claims nothing.
"""

from __future__ import annotations

from typing import Any

import structlog

from batchroute.runtime import Runtime
from batchroute.store import QUEUED, SUCCEEDED, Attempt, Job, utcnow
from batchroute.store import reuse as store_reuse

log = structlog.get_logger("batchroute.reuse")

REUSED = "reused"  # the Attempt outcome of a copied answer (cost 0, no call)
FIRST_WAIT_S = 0.2
MAX_WAIT_S = 5.0


#: The longest wait of a duplicate whose leader may be in a provider batch (answered in
#: minutes to hours): it looks again at most every 10 minutes, not every few seconds.
MAX_BATCH_WAIT_S = 600.0


def wait_delay(waits: int, cap_s: float = MAX_WAIT_S) -> float:
    """How long a duplicate waits before it looks at its leader again: 0.2 s, growing by
    half each time, at most `cap_s` (MAX_WAIT_S: calls last about a second; a leader that
    escalates through three tiers, a few; MAX_BATCH_WAIT_S behind a provider batch)."""
    return min(cap_s, FIRST_WAIT_S * 1.5 ** max(0, waits))


def try_reuse(rt: Runtime, job: Job, writes: Any) -> str | None:
    """Reuse or wait (returns what happened), or None: the job runs itself."""
    key = job.reuse_key
    if not key:
        return None
    found = store_reuse.peers(rt.store, key, job.batch_id, job.id)
    if found.source is not None:
        src = store_reuse.source(rt.store, found.source)
        if src is not None and src.state == SUCCEEDED and src.result is not None:
            return _copy(rt, writes, job, src)
    if found.leader is None or found.leader == job.id or found.failed_in_batch:
        return None
    return _wait(rt, job, found.leader)


def _origin(rt: Runtime, src: store_reuse.Source) -> dict[str, Any]:
    """Where the answer was paid for: the source itself, or (a copy of a copy) its own
    origin. `cost_usd` is every attempt the origin took to reach its answer (what the
    copy saved), `usage` its final answer's tokens (what the baseline prices)."""
    known = src.options.get("reused_from")
    if isinstance(known, dict) and "batch_id" in known:
        return dict(known)
    attempts = rt.store.job_attempts(src.id)
    answered = [a for a in attempts if a.outcome == "ok"]
    last = answered[-1] if answered else None
    return {"batch_id": src.batch_id, "custom_id": src.custom_id, "job_id": src.id,
            "cost_usd": round(sum(a.cost_usd for a in attempts), 10),
            "usage": [last.prompt_tokens, last.completion_tokens, last.cached_tokens]
            if last is not None else [0, 0, 0],
            "request_id": last.request_id if last is not None else ""}


def _copy(rt: Runtime, writes: Any, job: Job, src: store_reuse.Source) -> str:
    origin = _origin(rt, src)
    origin["within_batch"] = origin["batch_id"] == job.batch_id
    attempt = Attempt.model_construct(
        job_id=job.id, batch_id=job.batch_id, attempt_no=job.attempt_no, task=job.task,
        tier=src.tier, provider=src.provider, model=src.model, prompt_tokens=0,
        completion_tokens=0, cached_tokens=0, cost_usd=0.0, latency_ms=0.0, outcome=REUSED,
        error_kind=None, request_id=str(origin.get("request_id") or "")[:200], flags=None,
        reason=f"reused the answer of {origin['custom_id']} "
               f"(batch {origin['batch_id']})"[:500],
        created_at=utcnow())
    options = {k: v for k, v in job.options.items() if k != "reuse_waits"}
    options["reused_from"] = origin
    writes.finish(job, attempt, state=SUCCEEDED, result=src.result, verdicts=src.verdicts,
                  error=None, tier=src.tier, model=src.model, provider=src.provider,
                  options=options)
    log.info("answer_reused", batch_id=job.batch_id, job_id=job.id, custom_id=job.custom_id,
             from_batch=origin["batch_id"], from_custom_id=origin["custom_id"],
             saved_usd=origin.get("cost_usd"))
    return REUSED


def _wait(rt: Runtime, job: Job, leader: str) -> str:
    waits = int(job.options.get("reuse_waits", 0))
    options = dict(job.options) | {"reuse_waits": waits + 1}
    if rt.store.transition(job.id, job.attempt_no, state=QUEUED, options=options):
        model = rt.config.models.get(job.model)
        # Behind a provider batch the leader's answer takes minutes to hours: look less often.
        cap = (MAX_BATCH_WAIT_S if model is not None and rt.config.uses_batch_api(model)
               else MAX_WAIT_S)
        rt.dispatcher.enqueue(job.id, job.attempt_no, rt.config.providers[job.provider].queue,
                              wait_delay(waits, cap))
    log.debug("reuse_wait", batch_id=job.batch_id, job_id=job.id, leader=leader, waits=waits)
    return "reuse_wait"
