"""One attempt of one job, top to bottom: claim, call, record, validate, decide, move on.

This is the task body both the Celery worker and the embedded runner execute; a chunk
message (`process_chunk`) runs it for each of its jobs in turn.
The order matters for the guarantees: the Attempt is recorded (once, keyed by
attempt number) before the job moves on, and the job moves on with a guarded
UPDATE before the next message is published, so a crash anywhere leaves the
SQL store telling the truth.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from typing import Any

import structlog

from batchroute import billing, consensus, policy, pricing, waiting
from batchroute.adaptive import cascade_start
from batchroute.budget import BudgetRefused
from batchroute.completion import Completion, Usage
from batchroute.config import ModelConfig
from batchroute.policy import Action, Decision, Position
from batchroute.provider_batch.plan import wants_batch_api
from batchroute.providers import ProviderError, call
from batchroute.providers.base import ErrorKind
from batchroute.providers.retry_after import capped
from batchroute.ratelimit import Grant
from batchroute.reuse_run import try_reuse
from batchroute.router import pick_model
from batchroute.runtime import Runtime
from batchroute.store import BATCHED, FAILED, QUEUED, SUCCEEDED, Attempt, Job, Move
from batchroute.tokens import max_completion
from batchroute.validators import (
    build_for_run,
    failure_reason,
    passed,
    run_validators,
    specs_for_tier,
)

log = structlog.get_logger("batchroute.pipeline")


def process_job(rt: Runtime, job_id: str, attempt_no: int,
                writes: Writes | None = None) -> str:
    """Run attempt `attempt_no` of a job; returns what happened (for logs and tests).
    `writes`: where its final move goes (default: straight to the store; the embedded
    runner passes its `SharedWrites`)."""
    job = rt.store.claim(job_id, attempt_no)
    if job is None:
        log.debug("duplicate_or_stale_message", job_id=job_id, attempt=attempt_no)
        return "skipped"
    return run_claimed(rt, job, writes if writes is not None else Writes(rt, defer=False))


def process_chunk(rt: Runtime, pairs: list[tuple[str, int]]) -> dict[str, int]:
    """Run one attempt of each job of a chunk message, one after the other; returns how
    many ended how.

    Why chunks: a Celery message costs a worker about as much CPU as a whole zero-latency
    attempt (receive, bookkeeping, events, ack), and so do the claim's and the finish's
    round trips. Here a chunk's jobs are claimed in one statement and their finishes
    written together (see `Writes`), so those costs are paid once per chunk.
    `publish.chunk_size` keeps chunks small enough to spread a batch over every thread.
    """
    claimed = rt.store.claim_many(pairs)
    outcomes: dict[str, int] = {}
    if len(claimed) < len(pairs):
        outcomes["skipped"] = len(pairs) - len(claimed)
        log.debug("duplicate_or_stale_messages", skipped=len(pairs) - len(claimed))
    writes = Writes(rt, defer=True)
    started = time.monotonic()
    try:
        for index, job in enumerate(claimed):
            began = time.monotonic()
            if began - started > rt.store.lease_s / 2:
                # Slow calls: hand the jobs not started back before their claims lapse.
                outcomes["given_back"] = _give_back(rt, claimed[index:])
                break
            try:
                what = run_claimed(rt, job, writes)
            except Exception:  # as for a lone job: it stays running, the sweeper takes it
                log.exception("job_crashed", batch_id=job.batch_id, job_id=job.id,
                              attempt=job.attempt_no)
                what = "crashed"
            outcomes[what] = outcomes.get(what, 0) + 1
            if writes.due(time.monotonic() - began):
                writes.flush()
    finally:
        writes.flush()
    return outcomes


def _give_back(rt: Runtime, jobs: list[Job]) -> int:
    back = [(j.id, j.attempt_no, rt.config.providers[j.provider].queue) for j in jobs
            if rt.store.put_back(j.id, j.attempt_no)]
    rt.dispatcher.enqueue_many(back)
    log.warning("chunk_given_back", jobs=len(back))
    return len(back)


class Writes:
    """Where an attempt's final move goes: straight to the store, or, in a chunk, held
    and written with the chunk's others in one round trip.

    Only moves nobody waits on are held: a finished job (succeeded or failed). A move
    that publishes a next message (retry, failover, escalation) is written at once,
    because the message may only go out once the store says the job moved. Held moves
    are written when the chunk ends, or as soon as a job is done once the oldest of them
    is FLUSH_AFTER_S old or that job's call took as long (calls that slow make the
    chunk latency-bound: a write per job costs nothing there). So at zero latency a
    chunk writes once; a finished job waits at most for the next job's call. A worker
    killed meanwhile loses the held moves with their claims, and the sweeper runs those
    jobs again (the answer was paid for twice, nothing is lost)."""

    FLUSH_AFTER_S = 0.25

    def __init__(self, rt: Runtime, defer: bool) -> None:
        self.rt, self.defer = rt, defer
        self.pending: list[Move] = []
        self._since = 0.0

    def finish(self, job: Job, attempt: Attempt | None, **values: Any) -> None:
        if not self.defer:
            self.rt.store.transition(job.id, job.attempt_no, attempt, **values)
            return
        if not self.pending:
            self._since = time.monotonic()
        self.pending.append(Move(job.id, job.attempt_no, attempt, values))

    def due(self, last_job_s: float) -> bool:
        return bool(self.pending) and (
            last_job_s >= self.FLUSH_AFTER_S
            or time.monotonic() - self._since >= self.FLUSH_AFTER_S)

    def flush(self) -> None:
        if self.pending:
            moves, self.pending = self.pending, []
            write_moves(self.rt, moves)


def write_moves(rt: Runtime, moves: list[Move]) -> None:
    """Held moves in one transaction; if that fails, each on its own, so one move the
    store refuses (or a group write cut by an outage the store's retries outlasted) does
    not take the others' finished jobs with it. A move that fails alone is logged and
    left: its job stays running and the sweeper (or the next run) takes it again. The
    store still unreachable (a transient error after its own retries): the rest are left
    the same way at once, instead of each waiting out those retries again."""
    from batchroute.dbretry import is_transient

    try:
        rt.store.transition_many(moves)
        return
    except Exception as e:  # noqa: BLE001 - any failure: the moves are tried one by one
        log.warning("grouped_write_failed", moves=len(moves), error=repr(e)[:300])
        if is_transient(e):
            return
    for m in moves:
        try:
            rt.store.transition(m.job_id, m.from_attempt, m.attempt, **m.values)
        except Exception as e:  # noqa: BLE001 - logged; the job is reclaimed later
            log.exception("finish_write_failed", job_id=m.job_id, attempt=m.from_attempt)
            if is_transient(e):
                return


class SharedWrites(Writes):
    """`Writes` shared by the threads of one process (the embedded runner's workers):
    finished jobs' moves, whichever thread ran them, go to the store together, in one
    transaction per MAX_HELD moves or FLUSH_AFTER_S, instead of one each (on SQLite a
    finish cost ~0.6 ms of CPU alone, ~0.2 ms in a group; #14). The same moves and
    guarantees as a chunk's: each is guarded and atomic on its own, only finished jobs
    are held, and a process killed meanwhile loses held moves with their claims, which
    the next run takes again (`recovery.reclaim_for_local_run`). The owner flushes
    before reading results."""

    MAX_HELD = 64

    def __init__(self, rt: Runtime) -> None:
        super().__init__(rt, defer=True)
        self._lock = threading.Lock()

    def finish(self, job: Job, attempt: Attempt | None, **values: Any) -> None:
        with self._lock:
            super().finish(job, attempt, **values)
            full = len(self.pending) >= self.MAX_HELD
        if full or self.due(0.0):
            self.flush()

    def due(self, last_job_s: float) -> bool:
        with self._lock:
            return super().due(last_job_s)

    def flush(self) -> None:
        """Write what is held (by the caller's thread, outside the lock: other threads go
        on holding their moves meanwhile)."""
        with self._lock:
            moves, self.pending = self.pending, []
        if moves:
            write_moves(self.rt, moves)


def run_claimed(rt: Runtime, job: Job, writes: Writes) -> str:
    """One attempt of a job this worker has claimed: route, call, record, validate, decide."""
    attempt_no = job.attempt_no
    jlog = log.bind(batch_id=job.batch_id, job_id=job.id, custom_id=job.custom_id,
                    attempt=attempt_no, tier=job.tier)
    if job.model not in rt.config.models:
        return _finish_failed(rt, writes, job, "unknown_model",
                              f"model {job.model!r} is not in the routing config any more")
    if attempt_no == 1 and job.reuse_key:  # an identical request's answer, or wait for it
        reused = try_reuse(rt, job, writes)
        if reused is not None:
            return reused
    if attempt_no == 1 and rt.cascade.enabled:  # the adaptive cascade may skip the start tier
        job, moved = cascade_start(rt, job)
        if moved is not None:
            return moved
        jlog = jlog.bind(tier=job.tier)
    model = _choose_model(rt, job)
    if model is None:
        return _no_model_now(rt, job, writes)
    jlog = jlog.bind(model=model.name)
    provider = rt.config.provider_of(model)
    specs, body = request_for(rt, job, model)
    if _goes_to_provider_batch(rt, job, model):  # half price, answered within the window
        return _to_provider_batch(rt, job, model, body, writes, jlog)
    reserved_max = _max_cost(job, body, model)
    try:  # reserve this call's most expensive outcome under every budget that applies
        # Leased for the call's own deadline: a worker killed mid-call gives it back.
        hold = rt.budget.hold(job.batch_id, reserved_max, bool(job.escalations),
                              ttl_s=provider.deadline_s)
    except BudgetRefused as e:
        jlog.warning("budget_refused", reason=e.message)
        return _finish_failed(rt, writes, job, "budget_exhausted", e.message, model=model.name,
                              provider=model.provider)
    grant = rt.limiter.acquire(model, provider, job)  # may sleep up to ~1 s for capacity
    if grant.deferred:
        rt.budget.settle(hold, 0.0)
        return _wait_for_capacity(rt, job, grant, jlog)
    completion: Completion | None = None
    error: ProviderError | None = None
    charge: billing.Bill | None = None
    try:
        completion = call(rt.client, provider, rt.base_url(provider), model.api_model, body)
        # The reply's usage is outside data: believable, else recounted; cost bounded.
        charge = billing.bill(model, completion, job.prompt_tokens_est, _max_out(body),
                              reserved_max)
        completion = replace(completion, usage=charge.usage)
    except ProviderError as e:
        error = e
    finally:
        rt.limiter.settle(grant, completion, error)  # reconcile tokens, free the slot
    _feed_breaker(rt, model, error, jlog)
    rt.budget.settle(hold, charge.cost_usd if charge is not None else 0.0)
    return conclude(rt, job, model, specs, completion, error, charge, writes, jlog)


def request_for(rt: Runtime, job: Job, model: ModelConfig
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The checks of an attempt at this model's tier, and the body to send: a consensus
    check asks for its k samples as n choices of this one call."""
    specs = _validator_specs(rt, job, model.tier)
    return specs, consensus.with_samples(job.body, specs)


def conclude(rt: Runtime, job: Job, model: ModelConfig, specs: list[dict[str, Any]],
             completion: Completion | None, error: ProviderError | None,
             charge: billing.Bill | None, writes: Writes, jlog: Any) -> str:
    """After the call (synchronous, or a provider batch's result): record, validate,
    decide, move on. Exactly one of `completion` and `error` is set."""
    row = _attempt_row(job, model, job.attempt_no, completion, error, charge)
    if completion is not None:
        completion = consensus.majority_first(completion, specs)  # the voted answer first
        verdicts = run_validators(build_for_run(specs, rt.config.custom_validators),
                                  completion, request=job.body,
                                  earlier=earlier_answers(job.escalations))
        ok = passed(verdicts)
        row["outcome"] = "ok" if ok else "invalid"
        row["reason"] = "" if ok else failure_reason(verdicts)
        decision = policy.after_validation(_position(rt, job, model), ok, row["reason"])
    else:
        assert error is not None
        verdicts = []
        # A provider's Retry-After never outlasts the batch's deadline.
        wait = capped(error.retry_after,
                      waiting.batch_deadline(rt.store, job.batch_id) - time.time())
        decision = policy.after_error(_position(rt, job, model, error=True), error.kind,
                                      error.message, wait)
    # Built once, complete: model_construct skips validation (~50 µs), the values are ours.
    attempt = Attempt.model_construct(**row)
    jlog.info("attempt", outcome=attempt.outcome, action=decision.action.value,
              cost_usd=attempt.cost_usd, latency_ms=round(attempt.latency_ms, 1),
              reason=attempt.reason or None)
    # The Attempt row is written by the transition that moves the job on, in its transaction.
    return _apply(rt, writes, job, model, attempt, decision, completion, verdicts,
                  error.response if error is not None else None)


def _goes_to_provider_batch(rt: Runtime, job: Job, model: ModelConfig) -> bool:
    if not rt.config.uses_batch_api(model):  # the common case costs no lookup
        return False
    return wants_batch_api(True, waiting.provider_batch_flag(rt.store, job.batch_id),
                           job.options, time.time(),
                           waiting.batch_deadline(rt.store, job.batch_id))


# A parked job's budget hold outlives the batch deadline by this much: at the deadline
# an unfinished provider batch is cancelled, and the provider may take a while to end it
# before it is collected and the hold settled.
PARKED_HOLD_MARGIN_S = 2 * 3600.0


def _to_provider_batch(rt: Runtime, job: Job, model: ModelConfig, body: dict[str, Any],
                       writes: Writes, jlog: Any) -> str:
    """Park the job for the next provider batch of its pool (batchroute.provider_batch):
    no message is published; the provider-batch tick gathers, submits and collects. The
    budget is reserved now, at the batch price, and settled when the result comes."""
    try:
        # Leased until the batch's deadline (when an unfinished provider batch is
        # cancelled and collected) and a margin for that collect.
        hold = rt.budget.hold(job.batch_id, _max_cost(job, body, model)
                              * rt.config.provider_of(model).batch_discount,
                              bool(job.escalations),
                              ttl_s=max(0.0, waiting.batch_deadline(rt.store, job.batch_id)
                                        - time.time()) + PARKED_HOLD_MARGIN_S)
    except BudgetRefused as e:
        jlog.warning("budget_refused", reason=e.message)
        return _finish_failed(rt, writes, job, "budget_exhausted", e.message,
                              model=model.name, provider=model.provider)
    options = dict(job.options) | {"budget_hold": {"id": hold.id,
                                                   "parts": [list(p) for p in hold.parts]}}
    if not rt.store.transition(job.id, job.attempt_no, state=BATCHED, provider_batch_id=None,
                               model=model.name, provider=model.provider, options=options):
        rt.budget.settle(hold, 0.0)
        return "skipped"
    jlog.debug("provider_batch_waiting")
    return "batched"


def _available(rt: Runtime, tier: int, pin: str | None, exclude: set[str]) -> ModelConfig | None:
    """The first model of a tier that the job may use and whose breaker lets calls through."""
    for m in rt.config.models_at(tier):
        if pin and pin not in (m.name, m.provider):
            continue
        if m.name in exclude or m.provider in exclude:
            continue
        if rt.breakers.allow(m.name):
            return m
    return None


def _choose_model(rt: Runtime, job: Job) -> ModelConfig | None:
    """The job's model, or an equivalent of the same tier while its breaker is open."""
    current = rt.config.models[job.model]
    if rt.breakers.allow(current.name):
        return current
    exclude = set(job.options.get("exclude", [])) | {current.name}
    return _available(rt, job.tier, job.options.get("pin"), exclude)


def _feed_breaker(rt: Runtime, model: ModelConfig, error: ProviderError | None,
                  jlog: Any) -> None:
    """A 429 is not a health signal (the rate-limit pool slows down for it instead), so
    only successes and the errors that say the model is unwell reach the breaker."""
    if error is None:
        rt.breakers.record(model.name, True)
    elif (error.kind in policy.TRANSIENT and error.kind is not ErrorKind.RATE_LIMITED
          and rt.breakers.record(model.name, False)):
        jlog.warning("breaker_opened", retry_in_s=round(rt.breakers.retry_in(model.name), 1),
                     last_error=error.kind.value)


def _no_model_now(rt: Runtime, job: Job, writes: Writes) -> str:
    """Every model of the job's tier is cooling down: wait (until the batch deadline, with
    no higher tier) for a breaker to let calls through again, or let the next tier take
    the job. See `batchroute.waiting`."""
    waited = int(job.options.get("deferrals", 0))
    now = time.time()
    since = float(job.options.get("waiting_since", now))
    exclude = set(job.options.get("exclude", []))
    higher: tuple[int, ModelConfig] | None = None
    for index in range(job.tier_index + 1, len(job.ladder)):
        m = _available(rt, job.ladder[index], job.options.get("pin"), exclude)
        if m is not None:
            higher = (index, m)
            break
    tier_models = [m.name for m in rt.config.models_at(job.tier)]
    retry_in = min((rt.breakers.retry_in(n) for n in tier_models), default=0.0)
    deadline = waiting.batch_deadline(rt.store, job.batch_id)
    wait = waiting.when_no_model(now, deadline, retry_in, waited, since, higher is not None,
                                 rt.config.breaker.cooldown_s)
    options = dict(job.options) | {"deferrals": waited + 1, "waiting_since": since}
    if wait.action == "defer":
        if rt.store.transition(job.id, job.attempt_no, state=QUEUED, options=options):
            rt.dispatcher.enqueue(job.id, job.attempt_no,
                                  rt.config.providers[job.provider].queue, wait.delay_s)
        return "deferred"
    if wait.action == "escalate" and higher is not None:
        index, m = higher
        options = {k: v for k, v in options.items() if k not in ("deferrals", "waiting_since")}
        if rt.store.transition(job.id, job.attempt_no, state=QUEUED, tier_index=index,
                               tier=m.tier, model=m.name, provider=m.provider,
                               options=options):
            rt.dispatcher.enqueue(job.id, job.attempt_no, rt.config.providers[m.provider].queue)
        return "escalated_past_outage"
    return _finish_failed(rt, writes, job, wait.code or "no_model_available",
                          f"every model of tiers {job.ladder[job.tier_index:]} stayed down "
                          f"until the batch deadline ({round(now - since)} s waited, "
                          f"{waited} deferrals)")


def _max_out(body: dict[str, Any]) -> int:
    """The most completion tokens a call may return: max_tokens for each of its n choices."""
    n = body.get("n", 1)
    n = n if isinstance(n, int) and not isinstance(n, bool) else 1
    return max_completion(body) * max(1, n)


def _max_cost(job: Job, body: dict[str, Any], model: ModelConfig) -> float:
    """The most this call can cost: the prompt estimate plus a full max_tokens answer for
    each of the n choices it asks for (consensus samples)."""
    return pricing.model_cost(model, Usage(job.prompt_tokens_est, _max_out(body)))


def _wait_for_capacity(rt: Runtime, job: Job, grant: Grant, jlog: Any) -> str:
    """The pool has no capacity for a while: give the worker slot back and re-publish
    the job for when its turn comes (same attempt number: nothing was called)."""
    assert grant.defer_s is not None
    if rt.store.put_back(job.id, job.attempt_no):
        rt.dispatcher.enqueue(job.id, job.attempt_no, rt.config.providers[job.provider].queue,
                              grant.defer_s)
    jlog.info("rate_limited_deferred", pool=grant.pool, reason=grant.reason,
              countdown_s=grant.defer_s, waited_s=round(grant.waited_s, 3))
    return "throttled"


#: Longest answer an escalation record keeps for a later rung's `agree` check (longer
#: answers are not kept: they rarely match verbatim, and the record is stored per job).
MAX_KEPT_ANSWER = 4000


def earlier_answers(escalations: list[dict[str, Any]]) -> list[str]:
    """The answers of the rungs a job escalated from, oldest first (`agree` votes)."""
    return [e["answer"] for e in escalations if isinstance(e.get("answer"), str)]


def _validator_specs(rt: Runtime, job: Job, tier: int) -> list[dict[str, Any]]:
    """The checks of an attempt at `tier`: the task profile's and the job's, each once,
    minus those a ``"tiers"`` list limits to other tiers."""
    specs = list(rt.config.task(job.task).validators) + list(job.options.get("validators", []))
    # The same spec named by the profile and by the job runs once.
    unique = {json.dumps(s, sort_keys=True): s for s in specs}
    return specs_for_tier(list(unique.values()), tier)


def _attempt_row(job: Job, model: ModelConfig, attempt_no: int, completion: Completion | None,
                 error: ProviderError | None, charge: billing.Bill | None = None,
                 ) -> dict[str, Any]:
    """The Attempt's values; the pipeline adds the validation outcome, then builds it."""
    row: dict[str, Any] = dict(job_id=job.id, batch_id=job.batch_id, attempt_no=attempt_no,
                               task=job.task, tier=model.tier, provider=model.provider,
                               model=model.name, cost_usd=0.0, latency_ms=0.0, outcome="ok",
                               reason="")
    if completion is not None:
        row.update(prompt_tokens=completion.usage.prompt_tokens,
                   completion_tokens=completion.usage.completion_tokens,
                   cached_tokens=completion.usage.cached_tokens,
                   cost_usd=(charge.cost_usd if charge is not None
                             else pricing.model_cost(model, completion.usage)),
                   flags=charge.flags_text if charge is not None else None,
                   latency_ms=completion.latency_s * 1000,
                   request_id=completion.request_id[:200])
    elif error is not None:
        row.update(outcome="error", error_kind=error.kind.value, reason=error.message[:500])
    return row


def _position(rt: Runtime, job: Job, model: ModelConfig, error: bool = False) -> Position:
    consecutive = 1 if error else 0
    if error:
        for a in reversed(rt.store.job_attempts(job.id)):
            if a.outcome != "error" or a.model != model.name:
                break
            consecutive += 1
    exclude = set(job.options.get("exclude", [])) | {model.name}
    failover = pick_model(rt.config, job.tier, job.options.get("pin"), exclude) is not None
    # Nowhere else to go: a transient error is then waited out, until the batch deadline.
    can_wait = (error and not failover and job.tier_index + 1 >= len(job.ladder)
                and time.time() < waiting.batch_deadline(rt.store, job.batch_id))
    return Position(tier_index=job.tier_index, ladder_len=len(job.ladder),
                    attempt_no=job.attempt_no,
                    consecutive_errors=consecutive, has_failover=failover,
                    max_retries=rt.config.provider_of(model).max_retries,
                    can_wait=can_wait)


def _apply(rt: Runtime, writes: Writes, job: Job, model: ModelConfig, attempt: Attempt,
           decision: Decision, completion: Completion | None, verdicts: list[Any],
           provider_response: dict[str, Any] | None = None) -> str:
    """Carry out the policy's decision: exactly one guarded transition, which also records
    the attempt, then (for a retry, failover or escalation) the next message."""
    verdict_rows = [{"validator": v.validator, "ok": v.ok, "reason": v.reason, "score": v.score}
                    for v in verdicts]
    if decision.action is Action.SUCCEED:
        assert completion is not None
        writes.finish(job, attempt, state=SUCCEEDED, result=completion.body,
                      verdicts=verdict_rows, error=None, model=model.name,
                      provider=model.provider)
        return "succeeded"
    if decision.action is Action.FAIL:
        return _finish_failed(rt, writes, job, decision.error_code or "failed", decision.reason,
                              verdict_rows, attempt, model=model.name, provider=model.provider,
                              provider_response=provider_response)

    # A call was made: a later wait for a breaker starts its own count.
    options = {k: v for k, v in job.options.items() if k not in ("deferrals", "waiting_since")}
    tier_index, escalations = job.tier_index, list(job.escalations)
    exclude = set(options.get("exclude", []))
    if decision.action is Action.FAILOVER:
        exclude.add(model.name)
    next_model: ModelConfig | None = model
    if decision.action in (Action.FAILOVER, Action.ESCALATE):
        next_model = None
        if decision.action is Action.FAILOVER:
            next_model = pick_model(rt.config, job.ladder[tier_index], options.get("pin"), exclude)
        if next_model is None:  # up the ladder, past the tiers the adaptive cascade skips
            for index in rt.cascade.escalation_order(job.id, job.task, job.ladder, tier_index):
                next_model = pick_model(rt.config, job.ladder[index], options.get("pin"), exclude)
                if next_model is not None:
                    tier_index = index
                    break
        if next_model is None:
            return _finish_failed(rt, writes, job, "no_model_left",
                                  f"{decision.reason}; no model left on the ladder", verdict_rows,
                                  attempt)
        if next_model.tier != model.tier:
            escalations.append({"from_tier": model.tier, "to_tier": next_model.tier,
                                "from_model": model.name, "reason": decision.reason[:300]})
            if completion is not None and len(completion.content) <= MAX_KEPT_ANSWER:
                # What this rung answered, for an `agree` check on a later rung.
                escalations[-1]["answer"] = completion.content
            passed_over = list(job.ladder[job.tier_index + 1:tier_index])
            if passed_over:
                escalations[-1]["skipped_tiers"] = passed_over
    options["exclude"] = sorted(exclude)
    assert next_model is not None
    moved = rt.store.transition(
        job.id, job.attempt_no, attempt, state=QUEUED, attempt_no=job.attempt_no + 1,
        tier_index=tier_index, tier=next_model.tier, model=next_model.name,
        provider=next_model.provider, options=options, escalations=escalations,
        verdicts=verdict_rows)
    if moved:
        rt.dispatcher.enqueue(job.id, job.attempt_no + 1,
                              rt.config.providers[next_model.provider].queue, decision.delay_s)
    return decision.action.value


def _finish_failed(rt: Runtime, writes: Writes, job: Job, code: str, message: str,
                   verdicts: list[dict[str, Any]] | None = None, attempt: Attempt | None = None,
                   provider_response: dict[str, Any] | None = None, **values: Any) -> str:
    # Without verdicts of its own (nothing was called), the job keeps those of its last attempt.
    error: dict[str, Any] = {"code": code, "message": message}
    if provider_response is not None:  # the provider's HTTP answer, for the output line
        error["provider_response"] = provider_response
    writes.finish(job, attempt, state=FAILED, error=error,
                  verdicts=job.verdicts if verdicts is None else verdicts, **values)
    log.info("job_failed", batch_id=job.batch_id, job_id=job.id, code=code, reason=message)
    return "failed"
