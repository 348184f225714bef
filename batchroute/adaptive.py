"""The adaptive cascade at work: ledger statistics in, tier decisions for jobs out.

`batchroute.cascade` holds the math; this module feeds it and applies it:

- `Cascade` reads per-(task, tier) pass rates and mean costs from the Attempt ledger
  (`Store.tier_stats`, the last `[cascade] window` answered attempts of all batches) and
  keeps them for `ttl_s` seconds, so a worker runs one small query every few seconds,
  not one per job. One instance per process: on the Runtime for workers, one per
  ingestion for `submit`.
- Decisions are applied where a job's tier is chosen: at ingestion (`IngestStart`, so the
  job is published to the right pool's queue at once), when the job's first attempt is
  claimed (`cascade_start`: a large batch is ingested before any answer exists, so this is
  where it learns as it runs) and when a failed job escalates (the pipeline asks
  `Cascade.escalation_order`). A decision only ever moves a job *up* its own ladder
  (min_tier, max_tier, pin and the reference model's cap still hold) and never past its
  top tier, so the cascade trades money, never accepted outputs.
- `cascade_report` puts the numbers behind each decision into the batch report.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.exc import SQLAlchemyError

from batchroute import cascade as cmath
from batchroute.cascade import CascadeConfig, Plan, TierStats
from batchroute.completion import Usage
from batchroute.config import Config
from batchroute.pricing import model_cost
from batchroute.router import pick_model
from batchroute.store import QUEUED, SUCCEEDED, Attempt, Job, Store

if TYPE_CHECKING:
    from batchroute.runtime import Runtime

log = structlog.get_logger("batchroute.cascade")


@dataclass(frozen=True)
class Snapshot:
    """The statistics one refresh read: per task, per tier; and per task the mean tokens of
    an answered attempt (to estimate the cost of tiers it has not been tried on)."""

    tiers: dict[str, dict[int, TierStats]]
    mean_tokens: dict[str, tuple[float, float]]


EMPTY = Snapshot({}, {})


def read_snapshot(store: Store, window: int) -> Snapshot:
    tiers: dict[str, dict[int, TierStats]] = defaultdict(dict)
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0])
    for task, tier, answered, passed, cost, prompt, completion in store.tier_stats(window):
        tiers[task][tier] = TierStats(attempts=answered, passes=passed, cost_usd=cost)
        t = totals[task]
        t[0] += answered
        t[1] += prompt
        t[2] += completion
    means = {task: (p / n, c / n) for task, (n, p, c) in totals.items() if n}
    return Snapshot(dict(tiers), means)


class Cascade:
    """Per-process view of the ledger, and the tier decisions made from it.

    Thread-safe: the embedded runner and Celery's thread pool call it from many threads;
    one of them refreshes the statistics when they are older than `ttl_s`, the others keep
    using the previous ones meanwhile.
    """

    def __init__(self, config: Config, store: Store,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.settings: CascadeConfig = config.cascade
        self.store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._refreshing = False
        self._fetched_at: float | None = None
        self._snapshot = EMPTY
        self._plans: dict[tuple[str, tuple[int, ...]], Plan] = {}

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    # ---- statistics ----------------------------------------------------------------------
    def snapshot(self, force: bool = False) -> Snapshot:
        """The current statistics, re-read from the store when older than `ttl_s`."""
        now = self._clock()
        with self._lock:
            fresh = (self._fetched_at is not None
                     and now - self._fetched_at < self.settings.ttl_s)
            if (fresh and not force) or (self._refreshing and self._fetched_at is not None):
                return self._snapshot
            self._refreshing = True
        try:
            snap = read_snapshot(self.store, self.settings.window)
        except SQLAlchemyError as e:  # routing on the configured ladder beats failing jobs
            log.warning("cascade_stats_unavailable", error=str(e)[:200])
            snap = self._snapshot
        with self._lock:
            self._snapshot, self._fetched_at, self._refreshing = snap, now, False
            self._plans = {}
            return snap

    def estimates(self, task: str, ladder: Sequence[int], snap: Snapshot) -> dict[int, float]:
        """Cost per attempt of each tier for this task's mean tokens, at the price of the
        tier's preferred model: what a tier nobody tried yet would probably cost."""
        tokens = snap.mean_tokens.get(task)
        if tokens is None:
            return {}
        usage = Usage(prompt_tokens=round(tokens[0]), completion_tokens=round(tokens[1]))
        out: dict[int, float] = {}
        for tier in ladder:
            models = self.config.models_at(tier)
            if models:
                out[tier] = model_cost(models[0], usage)
        return out

    def plan(self, task: str, ladder: Sequence[int], force: bool = False) -> Plan:
        """The plan for one task and ladder, computed once per refresh."""
        snap = self.snapshot(force)
        key = (task, tuple(ladder))
        with self._lock:
            cached = self._plans.get(key)
        if cached is not None and not force:
            return cached
        p = cmath.plan(key[1], snap.tiers.get(task, {}), self.settings.min_observations,
                       self.estimates(task, key[1], snap))
        with self._lock:
            if self._snapshot is snap:
                self._plans[key] = p
        return p

    # ---- decisions -----------------------------------------------------------------------
    def start_index(self, job_id: str, task: str, ladder: Sequence[int], index: int) -> int:
        """Where a job routed to ladder[index] should start: there, or above a skipped tier."""
        if not self.enabled or index >= len(ladder) - 1:
            return index
        return cmath.start_index(self.plan(task, ladder), index, job_id,
                                 self.settings.explore_rate)

    def escalation_order(self, job_id: str, task: str, ladder: Sequence[int],
                         index: int) -> list[int]:
        """Ladder indices to try after ladder[index] failed, best first."""
        if not self.enabled or index + 2 >= len(ladder):  # zero or one tier left: no choice
            return list(range(index + 1, len(ladder)))
        return cmath.escalation_order(self.plan(task, ladder), index, job_id,
                                      self.settings.explore_rate)


class IngestStart:
    """Applies the start decision to Job rows before they are stored and published."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.cascade = Cascade(config, store)

    def apply(self, rows: list[dict[str, Any]]) -> int:
        """Move rows whose start tier the cascade skips; returns how many moved."""
        moved = 0
        for row in rows:
            ladder, index = row["ladder"], row["tier_index"]
            new = self.cascade.start_index(row["id"], row["task"], ladder, index)
            if new <= index:
                continue
            options = row["options"]
            model = pick_model(self.config, ladder[new], options.get("pin"))
            if model is None:
                continue
            row.update(tier_index=new, tier=model.tier, model=model.name,
                       provider=model.provider,
                       options=options | {"cascade_skipped": list(ladder[index:new])})
            moved += 1
        return moved


def ingest_start(config: Config, store: Store) -> IngestStart | None:
    """The ingest-time hook, or None when the cascade is off."""
    return IngestStart(config, store) if config.cascade.enabled else None


def cascade_start(rt: Runtime, job: Job) -> tuple[Job, str | None]:
    """At a job's first attempt: start above its routed tier if the cascade now skips it.

    Returns the (possibly updated) job and None to go on with the call, or an outcome when
    this run must stop: the new tier is served by another provider, whose queue the job is
    re-published to (same attempt number: nothing was called), or the job was taken from
    this run meanwhile.
    """
    index = rt.cascade.start_index(job.id, job.task, job.ladder, job.tier_index)
    if index <= job.tier_index:
        return job, None
    model = pick_model(rt.config, job.ladder[index], job.options.get("pin"),
                       set(job.options.get("exclude", [])))
    if model is None:
        return job, None
    skipped = list(job.ladder[job.tier_index:index])
    values: dict[str, Any] = {
        "tier_index": index, "tier": model.tier, "model": model.name,
        "provider": model.provider,
        "options": dict(job.options) | {"cascade_skipped": skipped}}
    log.info("cascade_start", batch_id=job.batch_id, job_id=job.id, task=job.task,
             skipped_tiers=skipped, tier=model.tier)
    if model.provider != job.provider:
        if rt.store.transition(job.id, job.attempt_no, state=QUEUED, **values):
            rt.dispatcher.enqueue(job.id, job.attempt_no,
                                  rt.config.providers[model.provider].queue)
        return job, "cascade_rerouted"
    if not rt.store.transition(job.id, job.attempt_no, **values):
        return job, "skipped"
    # A new Job rather than setattr: claim builds jobs without SQLAlchemy's instance state.
    return Job.model_construct(**(job.model_dump() | values)), None


# ---- the report ----------------------------------------------------------------------------


def _r(x: float | None, digits: int = 10) -> float | None:
    return None if x is None else round(x, digits)


def cascade_report(store: Store, config: Config, attempts: Sequence[Attempt],
                   jobs: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
    """Per task and tier: this batch's pass rate, mean cost per answered attempt, accepted
    outputs and cost per accepted output; and the router's current view (window statistics,
    expected costs, skipped or kept and why). With `[cascade] enabled = false` the router's
    view is what it would do; nothing was skipped.

    `jobs` are `Store.job_summaries` rows: (id, task, state, tier, ...).
    """
    job_task = {j[0]: j[1] for j in jobs}
    per: dict[str, dict[int, dict[str, Any]]] = defaultdict(lambda: defaultdict(lambda: {
        "attempts": 0, "answered": 0, "passes": 0, "cost_usd": 0.0, "accepted": 0,
        "accepted_cost_usd": 0.0}))
    job_cost: dict[str, float] = defaultdict(float)
    for a in attempts:
        task = job_task.get(a.job_id, a.task)
        b = per[task][a.tier]
        b["attempts"] += 1
        b["cost_usd"] += a.cost_usd
        if a.outcome in ("ok", "invalid"):
            b["answered"] += 1
            b["passes"] += a.outcome == "ok"
        job_cost[a.job_id] += a.cost_usd
    for jid, task, state, tier, *_ in jobs:
        if state == SUCCEEDED:
            b = per[task][tier]
            b["accepted"] += 1
            b["accepted_cost_usd"] += job_cost.get(jid, 0.0)

    router = Cascade(config, store)
    settings = config.cascade
    tasks: dict[str, Any] = {}
    for task in sorted(per):
        ladder = [t for t in config.task(task).ladder if config.models_at(t)]
        p = router.plan(task, ladder) if ladder else Plan(ladder=())
        plans = {tp.tier: tp for tp in p.tiers}
        rows: dict[str, Any] = {}
        for tier in sorted(set(per[task]) | set(ladder)):
            b = per[task][tier]
            answered, accepted = b["answered"], b["accepted"]
            tp = plans.get(tier)
            rows[str(tier)] = {
                "attempts": b["attempts"], "answered": answered, "passes": b["passes"],
                "pass_rate": round(b["passes"] / answered, 4) if answered else None,
                "cost_usd": _r(b["cost_usd"]),
                "mean_cost_usd": _r(b["cost_usd"] / answered) if answered else None,
                "accepted": accepted, "accepted_cost_usd": _r(b["accepted_cost_usd"]),
                "cost_per_accepted_usd": (_r(b["accepted_cost_usd"] / accepted)
                                          if accepted else None),
                "router": tp.as_dict() if tp is not None else None,
            }
        tasks[task] = {"ladder": ladder,
                       "skipped_tiers": list(p.skipped),
                       "expected_cost_usd": _r(p.expected_cost_usd), "tiers": rows}
    return {"enabled": settings.enabled, "min_observations": settings.min_observations,
            "explore_rate": settings.explore_rate, "window": settings.window, "tasks": tasks}
