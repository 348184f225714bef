"""Reports: what a batch spent, what it saved, and why each job ended where it did.

Computed from the Attempt ledger (what was billed) and the Job rows (where each
job ended), so the totals always equal the sum of the attempts. The baseline
is every job on its reference model (`body.model`, or the task's top tier),
priced from the same tokens.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from batchroute.completion import Usage
from batchroute.config import Config
from batchroute.pricing import reference_cost
from batchroute.store import FAILED, FINISHED, SUCCEEDED, Attempt, Store


def _bucket() -> dict[str, Any]:
    return {"jobs": 0, "succeeded": 0, "attempts": 0, "cost_usd": 0.0, "tokens": 0}


def resilience(attempts: list[Attempt]) -> dict[str, Any]:
    """What retries and failover did: each attempt compared with the job's previous one."""
    errors: dict[str, int] = defaultdict(int)
    moves = {"retries": 0, "failovers": 0, "escalations": 0}
    previous: dict[str, Attempt] = {}
    for a in attempts:
        if a.outcome == "error":
            errors[a.error_kind or "unknown"] += 1
        before = previous.get(a.job_id)
        if before is not None:
            if a.tier > before.tier:
                moves["escalations"] += 1
            elif a.model != before.model:
                moves["failovers"] += 1
            elif before.outcome == "error":
                moves["retries"] += 1
        previous[a.job_id] = a
    return {"provider_errors": dict(sorted(errors.items())), **moves}


def batch_report(store: Store, config: Config, batch_id: str) -> dict[str, Any]:
    batch = store.get_batch(batch_id)
    jobs = store.job_summaries(batch_id)
    attempts = store.attempts(batch_id)
    groups: dict[str, dict[str, dict[str, Any]]] = {
        k: defaultdict(_bucket) for k in ("by_tier", "by_model", "by_provider", "by_task")}
    job_task = {j[0]: j[1] for j in jobs}
    last_usage: dict[str, Usage] = {}
    cost = 0.0
    for a in attempts:
        tokens = a.prompt_tokens + a.completion_tokens
        cost += a.cost_usd
        for key, value in (("by_tier", str(a.tier)), ("by_model", a.model),
                           ("by_provider", a.provider),
                           ("by_task", job_task.get(a.job_id, a.task))):
            b = groups[key][value]
            b["attempts"] += 1
            b["cost_usd"] += a.cost_usd
            b["tokens"] += tokens
        if a.outcome != "error":
            last_usage[a.job_id] = Usage(a.prompt_tokens, a.completion_tokens, a.cached_tokens)

    counts: dict[str, int] = defaultdict(int)
    baseline, unpriced, escalated = 0.0, 0, 0
    for (jid, task, state, tier, model, provider, ref, n_esc, est, _meta) in jobs:
        counts[state] += 1
        escalated += n_esc > 0
        for key, value in (("by_tier", str(tier)), ("by_model", model),
                           ("by_provider", provider), ("by_task", task)):
            if key == "by_task" or state in FINISHED:
                groups[key][value]["jobs"] += 1
                groups[key][value]["succeeded"] += state == SUCCEEDED
        usage = last_usage.get(jid) or Usage(est, 0)
        ref_cost = reference_cost(config, ref, usage) if ref else None
        if ref_cost is None:
            unpriced += 1
        else:
            baseline += ref_cost

    n = len(jobs)
    succeeded = counts.get(SUCCEEDED, 0)
    report: dict[str, Any] = {
        "batch_id": batch_id,
        "name": batch.name if batch else "",
        "jobs": n,
        "succeeded": succeeded,
        "failed": counts.get(FAILED, 0),
        "pending": n - sum(counts.get(s, 0) for s in FINISHED),
        "bad_lines": batch.error_lines if batch else 0,
        "attempts": len(attempts),
        "cost_usd": round(cost, 8),
        "baseline_cost_usd": round(baseline, 8),
        "savings_usd": round(baseline - cost, 8),
        "savings_pct": round(100.0 * (baseline - cost) / baseline, 2) if baseline > 0 else 0.0,
        "escalation_rate": round(escalated / n, 4) if n else 0.0,
        "cost_per_success_usd": round(cost / succeeded, 8) if succeeded else None,
        "unpriced_reference_jobs": unpriced,
    }
    report["resilience"] = resilience(attempts)
    for key, buckets in groups.items():
        report[key] = {
            k: {**v, "cost_usd": round(v["cost_usd"], 8),
                "cost_per_success_usd": (round(v["cost_usd"] / v["succeeded"], 8)
                                         if v["succeeded"] else None)}
            for k, v in sorted(buckets.items())}
    return report
