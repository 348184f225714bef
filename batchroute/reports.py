"""Reports: what a batch spent, what it saved, and why each job ended where it did.

Computed from the Attempt ledger (what was billed) and the Job rows (where each
job ended), so the totals always equal the sum of the attempts. The baseline
is every job on its reference model (`body.model`, or the task's top tier),
priced from the same tokens.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from batchroute.adaptive import cascade_report
from batchroute.completion import Usage
from batchroute.config import Config
from batchroute.pricing import model_cost, reference_cost
from batchroute.provider_batch.pricing import BATCH_FLAG
from batchroute.reuse_run import REUSED
from batchroute.store import FAILED, FINISHED, SUCCEEDED, Attempt, Store, provider_batches
from batchroute.store.reuse import reused_from


def _bucket() -> dict[str, Any]:
    return {"jobs": 0, "succeeded": 0, "attempts": 0, "cost_usd": 0.0, "tokens": 0,
            "accepted_cost_usd": 0.0}


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


def _tags(metadata: dict[str, Any]) -> list[str]:
    """`key=value` for each scalar metadata entry: what teams and projects are billed by."""
    return [f"{k}={v}" for k, v in sorted(metadata.items())
            if isinstance(v, (str, int, float, bool))]


def _add_attempt(bucket: dict[str, Any], cost: float, tokens: int) -> None:
    bucket["attempts"] += 1
    bucket["cost_usd"] += cost
    bucket["tokens"] += tokens


def _batch_discount(config: Config, a: Attempt) -> float:
    """What an attempt answered through a provider batch saved against the same call
    made synchronously (its tokens at the model's synchronous price)."""
    if not a.flags or BATCH_FLAG not in a.flags.split(","):
        return 0.0
    model = config.models.get(a.model)
    if model is None:
        return 0.0
    sync = model_cost(model, Usage(a.prompt_tokens, a.completion_tokens, a.cached_tokens))
    return max(0.0, sync - a.cost_usd)


def batch_report(store: Store, config: Config, batch_id: str) -> dict[str, Any]:
    """The report of one batch (`batchroute report BATCH --json`).

    Cost per accepted output, defined once for every bucket (by_tier, by_model,
    by_provider, by_task, by_tag): ``accepted_cost_usd`` is the cost of *all* attempts of
    the jobs that ended accepted in the bucket (a job belongs to the tier, model and
    provider that gave its accepted answer), including their failed attempts at cheaper
    tiers and their provider errors; ``cost_per_success_usd`` = accepted_cost_usd / the
    bucket's accepted jobs, i.e. what getting one accepted output there cost. A bucket's
    ``cost_usd`` is something else: what was billed at that tier/model/provider (or for
    that task/tag), whichever way the jobs ended. Jobs that ended without an accepted
    answer have no tier of acceptance: their spend is the top-level
    ``unaccepted_cost_usd``. The top-level ``cost_per_success_usd`` is all spend over all
    accepted outputs (``cost_usd / succeeded``): what the batch paid per accepted output,
    failed jobs included. ``cascade``: per task and tier, pass rates, mean cost per
    answered attempt, cost per accepted output, and the adaptive router's decisions with
    their expected costs (`batchroute.adaptive.cascade_report`).

    Answer reuse (`batchroute.reuse_run`): a reused job has one $0 attempt (outcome
    "reused", counted in ``attempts``) and is priced in the baseline from the tokens of
    the answer it copied. ``reuse`` counts the hits (within this batch, from earlier
    batches) and the money saved: what the jobs whose answers were copied paid for them,
    every attempt included. ``savings_by_source`` splits ``savings_usd`` (baseline minus
    cost) into ``reuse_usd`` (that saving), ``batch_discount_usd`` (provider batch APIs:
    not implemented yet, always 0) and ``routing_usd``, the rest: what routing to cheaper
    tiers saved (negative if escalations cost more than the reference models would have).
    """
    batch = store.get_batch(batch_id)
    jobs = store.job_summaries(batch_id)
    attempts = store.attempt_rows(batch_id)  # rows, read like Attempts
    groups: dict[str, dict[str, dict[str, Any]]] = {
        k: defaultdict(_bucket)
        for k in ("by_tier", "by_model", "by_provider", "by_task", "by_tag")}
    job_task = {j[0]: j[1] for j in jobs}
    job_tags = {j[0]: _tags(j[9]) for j in jobs}
    last_usage: dict[str, Usage] = {}
    job_cost: dict[str, float] = defaultdict(float)
    cost = batch_discount = 0.0
    for a in attempts:
        tokens = a.prompt_tokens + a.completion_tokens
        cost += a.cost_usd
        batch_discount += _batch_discount(config, a)
        job_cost[a.job_id] += a.cost_usd
        for key, value in (("by_tier", str(a.tier)), ("by_model", a.model),
                           ("by_provider", a.provider),
                           ("by_task", job_task.get(a.job_id, a.task))):
            _add_attempt(groups[key][value], a.cost_usd, tokens)
        for tag in job_tags.get(a.job_id, ()):
            _add_attempt(groups["by_tag"][tag], a.cost_usd, tokens)
        if a.outcome != "error":
            last_usage[a.job_id] = Usage(a.prompt_tokens, a.completion_tokens, a.cached_tokens)

    reused = reused_from(store, {a.job_id for a in attempts if a.outcome == REUSED})
    reuse_saved, within = 0.0, 0
    for jid, info in reused.items():
        reuse_saved += float(info.get("cost_usd") or 0.0)
        within += bool(info.get("within_batch"))
        usage = info.get("usage") or [0, 0, 0]
        last_usage[jid] = Usage(int(usage[0]), int(usage[1]), int(usage[2]))

    counts: dict[str, int] = defaultdict(int)
    baseline, unpriced, escalated = 0.0, 0, 0
    for (jid, task, state, tier, model, provider, ref, n_esc, est, meta) in jobs:
        counts[state] += 1
        escalated += n_esc > 0
        for key, value in (("by_tier", str(tier)), ("by_model", model),
                           ("by_provider", provider), ("by_task", task),
                           *(("by_tag", t) for t in _tags(meta))):
            # Tier, model and provider count the jobs that *ended* there; task and tag
            # count every job of theirs.
            if key in ("by_task", "by_tag") or state in FINISHED:
                groups[key][value]["jobs"] += 1
                groups[key][value]["succeeded"] += state == SUCCEEDED
                if state == SUCCEEDED:
                    groups[key][value]["accepted_cost_usd"] += job_cost.get(jid, 0.0)
        usage = last_usage.get(jid) or Usage(est, 0)
        ref_cost = reference_cost(config, ref, usage) if ref else None
        if ref_cost is None:
            unpriced += 1
        else:
            baseline += ref_cost

    n = len(jobs)
    succeeded = counts.get(SUCCEEDED, 0)
    accepted_cost = sum(job_cost.get(j[0], 0.0) for j in jobs if j[2] == SUCCEEDED)
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
        "accepted_cost_usd": round(accepted_cost, 8),
        "unaccepted_cost_usd": round(cost - accepted_cost, 8),
        "unpriced_reference_jobs": unpriced,
        "budget_usd": batch.budget_usd if batch else None,
    }
    report["provider_batches"] = provider_batches.summary(
        provider_batches.of_batch(store, batch_id))
    report["reuse"] = {"hits": len(reused), "within_batch": within,
                       "across_batches": len(reused) - within,
                       "saved_usd": round(reuse_saved, 8)}
    report["savings_by_source"] = {
        "routing_usd": round(baseline - cost - reuse_saved - batch_discount, 8),
        "batch_discount_usd": round(batch_discount, 8),
        "reuse_usd": round(reuse_saved, 8)}
    report["resilience"] = resilience(attempts)
    for key, buckets in groups.items():
        report[key] = {
            k: {**v, "cost_usd": round(v["cost_usd"], 8),
                "accepted_cost_usd": round(v["accepted_cost_usd"], 8),
                "cost_per_success_usd": (round(v["accepted_cost_usd"] / v["succeeded"], 8)
                                         if v["succeeded"] else None)}
            for k, v in sorted(buckets.items())}
    report["cascade"] = cascade_report(store, config, attempts, jobs)
    return report
