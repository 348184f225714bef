"""The provider-batch tick: gather waiting jobs, submit, poll, collect, send on.

One call of `tick` does every step that is due and returns; beat runs it in the Celery
deployment (`workers.provider_batches`), the embedded runner runs it from its wait loop.
Every step can be killed at any point and run again, by this process or another:

* **gather**: jobs parked in state ``batched`` (`pipeline._to_provider_batch`) become a
  `ProviderBatch` row, and point at it, in one transaction, before anything is uploaded.
* **submit**: the row says ``submitting`` before the first byte goes out. A submitter
  that dies before it stores the provider's id leaves that state behind; after
  `submit_timeout_s` the next tick looks the batch up at the provider (OpenAI: by the
  row id in the batch's metadata; Anthropic, which has no metadata: a batch of the same
  size created since, whose id no row has) and adopts it, or submits again if the
  provider has none. So a crash never sends one provider batch twice.
* **poll**: a submitted row is polled every `poll_s` (never by a blocked worker). At the
  batch's deadline a provider batch still running is cancelled: waiting stops there.
* **collect**: once ended, each answered job is claimed (``batched`` -> ``running``) and
  goes through `pipeline.conclude` exactly like a synchronous answer: recorded at the
  batch price, validated, escalated or retried by the same policy. A request the provider
  did not answer (expired, cancelled, missing) goes into the next provider batch or,
  past `max_expiries` or the deadline, synchronously, with the reason logged. A job a
  user cancelled whose request was answered anyway gets its Attempt recorded (the
  provider bills it) with the answer discarded.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from batchroute import billing, secrets, waiting
from batchroute.budget import Hold
from batchroute.completion import Completion
from batchroute.config import ModelConfig, ProviderConfig
from batchroute.provider_batch import formats
from batchroute.provider_batch.client import (
    AnthropicBatchClient,
    BatchClient,
    BatchStatus,
    OpenAIBatchClient,
    parse,
)
from batchroute.provider_batch.plan import SYNC, Limits, after_unanswered, ready_groups
from batchroute.provider_batch.pricing import BATCH_FLAG, batch_cost
from batchroute.providers.base import ErrorKind, ProviderError
from batchroute.runtime import Runtime
from batchroute.store import BATCHED, CANCELLED, QUEUED, Attempt, Job, ProviderBatch, utcnow
from batchroute.store import provider_batches as spb

log = structlog.get_logger("batchroute.provider_batch")

#: Attempt outcome of an answer the provider billed for a job cancelled meanwhile.
DISCARDED = "discarded"
# How far before a dead submission began its lookup reads the provider's batches.
LOOKUP_SLACK = timedelta(minutes=10)


@dataclass
class TickReport:
    gathered: int = 0  # provider batches formed
    submitted: int = 0
    adopted: int = 0  # found at the provider after a submitter died
    polled: int = 0
    collected: int = 0  # provider batches whose results were recorded
    answered: int = 0  # jobs moved on by a result
    resent: int = 0  # jobs sent on unanswered (next provider batch or synchronous)
    cancelled: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def tick(rt: Runtime) -> TickReport:
    """Every provider-batch step that is due now (see the module docstring)."""
    report = TickReport()
    try:
        _gather(rt, report)
    except Exception:  # a database hiccup: the jobs stay waiting for the next tick
        log.exception("provider_batch_gather_failed")
    now = utcnow()
    for pb in spb.due(rt.store, now):
        if not spb.lease(rt.store, pb, now, rt.config.provider_batch.lease_s):
            continue  # another tick has it
        plog = log.bind(batch_id=pb.batch_id, provider_batch=pb.id, provider=pb.provider)
        try:
            _step(rt, pb, report, plog)
        except ProviderError as e:  # the batch API is unwell: wait for the next poll
            plog.warning("provider_batch_api_error", kind=e.kind.value, error=e.message[:300])
            spb.set_fields(rt.store, pb.id, note=f"{e.kind.value}: {e.message[:300]}",
                           next_poll_at=utcnow() + timedelta(
                               seconds=rt.config.provider_batch.poll_s))
            if time.time() >= waiting.batch_deadline(rt.store, pb.batch_id):
                # Past the deadline with the batch API unreachable: waiting stops; the
                # jobs run synchronously (if the provider batch still answers, those
                # answers are not collected: the provider may bill them).
                _give_up(rt, pb, f"batch API unreachable at the deadline: {e.message}",
                         state="abandoned")
        except Exception:  # e.g. the store briefly unreachable: every step runs again
            plog.exception("provider_batch_step_failed", state=pb.state)
        finally:
            try:
                spb.set_fields(rt.store, pb.id, lease_until=None)
            except Exception:  # the lease then lapses after lease_s
                plog.warning("provider_batch_lease_kept", exc_info=True)
    return report


def pending(rt: Runtime, batch_id: str) -> bool:
    """Whether a batch still has jobs waiting for or inside a provider batch."""
    return rt.store.state_counts(batch_id).get(BATCHED, 0) > 0


# ---- gather ------------------------------------------------------------------------------
def _gather(rt: Runtime, report: TickReport) -> None:
    jobs = spb.waiting(rt.store)
    if not jobs:
        return
    cfg = rt.config.provider_batch
    busy = spb.busy_batches(rt.store, sorted({j.batch_id for j in jobs}))
    limits = {name: Limits.of(p.kind, cfg.max_requests, cfg.max_tokens)
              for name, p in rt.config.providers.items()}
    for group in ready_groups(jobs, utcnow(), cfg.gather_s, busy, limits):
        first = group[0]
        row = ProviderBatch(id=f"pb_{uuid.uuid4().hex[:24]}", batch_id=first.batch_id,
                            provider=first.provider, model=first.model,
                            api=rt.config.providers[first.provider].kind, jobs=len(group))
        taken = spb.create(rt.store, row, group)  # type: ignore[arg-type]
        if taken:
            report.gathered += 1
            log.info("provider_batch_gathered", batch_id=row.batch_id, provider_batch=row.id,
                     provider=row.provider, model=row.model, jobs=taken)


# ---- one provider batch ------------------------------------------------------------------
def _step(rt: Runtime, pb: ProviderBatch, report: TickReport, plog: Any) -> None:
    provider = rt.config.providers.get(pb.provider)
    model = rt.config.models.get(pb.model)
    if provider is None or model is None:
        plog.error("provider_batch_config_gone", model=pb.model)
        _give_up(rt, pb, f"model {pb.model!r} is no longer in the routing config")
        return
    client = _client(rt, provider)
    if pb.state == "building":
        if pb.cancel_requested:
            spb.set_fields(rt.store, pb.id, state="cancelled", ended_at=utcnow())
            report.cancelled += 1
            return
        _submit(rt, pb, provider, model, client, report, plog)
    elif pb.state == "submitting":
        _recover_submission(rt, pb, client, report, plog)
    elif pb.state == "submitted":
        _poll(rt, pb, client, model, report, plog)
    elif pb.state == "collecting":
        assert pb.remote_id is not None
        _collect(rt, pb, client.poll(pb.remote_id), client, model, report, plog)


def _client(rt: Runtime, provider: ProviderConfig) -> BatchClient:
    key = secrets.api_key(provider.api_key_env)
    base = rt.base_url(provider)
    if provider.kind == "anthropic":
        return AnthropicBatchClient(rt.client, base, key, timeout_s=provider.timeout_s)
    return OpenAIBatchClient(rt.client, base, key, timeout_s=provider.timeout_s)


def _submit(rt: Runtime, pb: ProviderBatch, provider: ProviderConfig, model: ModelConfig,
            client: BatchClient, report: TickReport, plog: Any) -> None:
    from batchroute.pipeline import request_for

    jobs = spb.jobs_of(rt.store, pb.id)
    if not jobs:  # all cancelled or moved on meanwhile
        spb.set_fields(rt.store, pb.id, state="done", ended_at=utcnow(), jobs=0)
        return
    if time.time() >= waiting.batch_deadline(rt.store, pb.batch_id):
        # Waiting stops at the deadline: no provider batch is started past it.
        _give_up(rt, pb, "batch deadline reached before the provider batch was sent",
                 note="deadline reached before submission")
        return
    requests = [(formats.custom_id_for(j.id), model.api_model, request_for(rt, j, model)[1])
                for j in jobs]
    try:
        groups = formats.split_requests(provider.kind, requests)
    except formats.BatchTooLarge as e:  # one request alone is over the API's byte limit
        plog.warning("provider_batch_request_too_large", error=str(e))
        _give_up(rt, pb, f"too large for a provider batch: {e}")
        return
    keep = {cid for cid, _, _ in groups[0]}
    overflow = [j.id for j in jobs if formats.custom_id_for(j.id) not in keep]
    if overflow:  # over the byte limit: the rest wait for the next provider batch
        spb.release(rt.store, pb.id, overflow)
    # Stored before anything goes out: from here a crash is recovered by lookup.
    spb.set_fields(rt.store, pb.id, state="submitting", submitting_at=utcnow(),
                   jobs=len(keep))
    try:
        if isinstance(client, OpenAIBatchClient):
            file_id = client.upload(formats.openai_input_file(groups[0]), f"{pb.id}.jsonl")
            spb.set_fields(rt.store, pb.id, input_file_id=file_id)
            remote = client.create(file_id, metadata={"batchroute_id": pb.id,
                                                      "batch_id": pb.batch_id[:500]})
        else:
            remote = client.submit(formats.anthropic_create_body(groups[0]))
    except ProviderError as e:
        if e.kind in (ErrorKind.INVALID_REQUEST, ErrorKind.AUTH):
            # Refused outright (nothing was created): the calls go out synchronously.
            plog.warning("provider_batch_refused", kind=e.kind.value, error=e.message[:300])
            _give_up(rt, pb, f"the provider refused the batch: {e.message[:200]}",
                     note=e.message[:300])
            return
        raise  # may or may not exist at the provider: the lookup decides, later
    now = utcnow()
    spb.set_fields(rt.store, pb.id, state="submitted", remote_id=remote, submitted_at=now,
                   next_poll_at=now + timedelta(seconds=rt.config.provider_batch.poll_s))
    report.submitted += 1
    plog.info("provider_batch_submitted", remote_id=remote, jobs=len(keep),
              model=model.name)


def _recover_submission(rt: Runtime, pb: ProviderBatch, client: BatchClient,
                        report: TickReport, plog: Any) -> None:
    """A row left in "submitting": adopt the provider's batch if it exists, else resend."""
    started = waiting.aware(pb.submitting_at or pb.created_at)
    if utcnow() - started < timedelta(seconds=rt.config.provider_batch.submit_timeout_s):
        return  # its submitter may still be at it
    known = spb.remote_ids(rt.store, pb.provider)
    found = _find_remote(client, pb, started, known)
    now = utcnow()
    if found is not None:
        spb.set_fields(rt.store, pb.id, state="submitted", remote_id=found, submitted_at=now,
                       next_poll_at=now)
        report.adopted += 1
        plog.warning("provider_batch_adopted", remote_id=found)
    else:
        spb.set_fields(rt.store, pb.id, state="building", input_file_id=None)
        plog.warning("provider_batch_resubmitting", reason="not found at the provider")


def _find_remote(client: BatchClient, pb: ProviderBatch, since: datetime,
                 known: set[str]) -> str | None:
    """The provider's batch this row's dead submitter created, read newest first, page
    by page, back to LOOKUP_SLACK before the submission began (older: it was never
    created; the slack allows for a provider clock that runs behind ours)."""
    for status in client.recent():
        created = _parse_time(status.raw.get("created_at"))
        if created is not None and created < since - LOOKUP_SLACK:
            return None
        if status.id in known:
            continue
        meta = status.raw.get("metadata")
        if isinstance(meta, dict) and meta.get("batchroute_id") == pb.id:
            return status.id
        if client.api == "anthropic" and created is not None \
                and created >= since - timedelta(seconds=60) \
                and sum(status.counts.values()) == pb.jobs:
            return status.id
    return None


def _poll(rt: Runtime, pb: ProviderBatch, client: BatchClient, model: ModelConfig,
          report: TickReport, plog: Any) -> None:
    assert pb.remote_id is not None
    deadline = waiting.batch_deadline(rt.store, pb.batch_id)
    status = client.poll(pb.remote_id)
    report.polled += 1
    learnt: dict[str, Any] = {}
    if not status.ended and (pb.cancel_requested or time.time() >= deadline):
        learnt["note"] = ("cancelled by the user" if pb.cancel_requested
                          else "batch deadline reached")
        if pb.remote_status not in ("cancelling", "canceling"):
            status = client.cancel(pb.remote_id)
            plog.info("provider_batch_cancel_sent", reason=learnt["note"])
    if status.ended:
        learnt["state"] = "collecting"
    spb.set_fields(rt.store, pb.id, remote_status=status.status, counts=status.counts,
                   next_poll_at=utcnow() + timedelta(seconds=rt.config.provider_batch.poll_s),
                   **learnt)
    if status.ended:
        _collect(rt, pb, status, client, model, report, plog)


def _collect(rt: Runtime, pb: ProviderBatch, status: BatchStatus, client: BatchClient,
             model: ModelConfig, report: TickReport, plog: Any) -> None:
    """Record every answer and send every unanswered job on; idempotent (a job moves only
    from ``batched`` in this provider batch, an Attempt only once per attempt number)."""
    from batchroute.pipeline import Writes

    content = client.results(status) if status.result_refs else b""
    everyone = spb.jobs_of(rt.store, pb.id, any_state=True)
    cid_of = {job_id: cid for cid, job_id in formats.custom_ids(j.id for j in everyone).items()}
    parsed = parse(client, content, list(cid_of.values()))
    if parsed.problems:
        plog.warning("provider_batch_result_problems", problems=parsed.problems[:10],
                     count=len(parsed.problems))
    claimed = spb.claim(rt.store, pb.id, [(j.id, j.attempt_no) for j in everyone
                                          if j.state == BATCHED])
    taken = {j.id for j in claimed}
    took_s = (utcnow() - waiting.aware(pb.submitted_at or pb.created_at)).total_seconds()
    writes = Writes(rt, defer=True)
    failed_batch = status.status == "failed"
    answered = 0
    try:
        for job in claimed:
            item = parsed.items.get(cid_of[job.id])
            if item is not None and item.state in ("succeeded", "errored"):
                _record(rt, job, model, item.completion, item.error, took_s, writes)
                answered += 1
            else:
                why = item.state if item is not None else (
                    "failed" if failed_batch else "missing from the results")
                _send_on(rt, job, pb, why, force_sync=failed_batch, plog=plog)
                report.resent += 1
    finally:
        writes.flush()
    for job in everyone:  # cancelled by the user meanwhile
        # Still holding its budget reservation: not yet settled (a rerun skips it).
        if job.id in taken or job.state != CANCELLED or "budget_hold" not in job.options:
            continue
        item = parsed.items.get(cid_of[job.id])
        if item is not None and item.completion is not None:  # answered (billed) anyway
            _record_discarded(rt, job, model, item.completion)
        else:
            rt.budget.settle(_hold_of(job), 0.0)
            spb.settle_cancelled(rt.store, job.id, job.attempt_no, _without_hold(job).options,
                                 next_attempt=False)
    spb.set_fields(rt.store, pb.id, state="done", ended_at=utcnow(),
                   remote_status=status.status, counts=status.counts)
    report.collected += 1
    report.answered += answered
    plog.info("provider_batch_collected", remote_id=pb.remote_id, status=status.status,
              answered=answered, jobs=len(everyone))


def _hold_of(job: Job) -> Hold:
    held = job.options.get("budget_hold") or []
    # {"id", "parts"}; a bare list of parts was written before holds were leases.
    parts, hold_id = ((held.get("parts") or [], str(held.get("id") or ""))
                      if isinstance(held, dict) else (held, ""))
    return Hold(tuple((str(k), float(limit), float(amount)) for k, limit, amount in parts),
                hold_id)


def _drop_hold(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k != "budget_hold"}


def _without_hold(job: Job) -> Job:
    """The job without its reservation note (a new object: rows are built with
    model_construct, which cannot be changed by setattr)."""
    return Job.model_construct(**(job.model_dump() | {"options": _drop_hold(job.options)}))


def _record(rt: Runtime, job: Job, model: ModelConfig, completion: Completion | None,
            error: ProviderError | None, took_s: float, writes: Any) -> None:
    """One answered request: billed at the batch price, then the synchronous path's end."""
    from batchroute.pipeline import conclude, request_for

    specs, body = request_for(rt, job, model)
    charge: billing.Bill | None = None
    if completion is not None:
        charge = _charge(rt, job, model, completion, body)
        completion = replace(completion, usage=charge.usage, latency_s=took_s)
    rt.budget.settle(_hold_of(job), charge.cost_usd if charge is not None else 0.0)
    jlog = log.bind(batch_id=job.batch_id, job_id=job.id, custom_id=job.custom_id,
                    attempt=job.attempt_no, tier=job.tier, model=model.name)
    conclude(rt, _without_hold(job), model, specs, completion, error, charge, writes, jlog)


def _charge(rt: Runtime, job: Job, model: ModelConfig, completion: Completion,
            body: dict[str, Any] | None = None) -> billing.Bill:
    """The reply's usage checked as for a synchronous call (believable, else recounted;
    cost bounded by the reservation), priced at the batch price. `body`: the request as
    sent (`pipeline.request_for`), when the caller has it already."""
    from batchroute.pipeline import _max_cost, _max_out, request_for

    if body is None:
        body = request_for(rt, job, model)[1]
    bill = billing.bill(model, completion, job.prompt_tokens_est, _max_out(body),
                        _max_cost(job, body, model))
    cost = batch_cost(model, bill.usage, rt.config.provider_of(model).batch_discount)
    return billing.Bill(bill.usage, cost, (*bill.flags, BATCH_FLAG))


def _send_on(rt: Runtime, job: Job, pb: ProviderBatch, why: str, force_sync: bool,
             plog: Any) -> None:
    """A request the provider batch did not answer (nothing billed): next provider batch
    or synchronous (`plan.after_unanswered`)."""
    expiries = int(job.options.get("batch_expiries", 0)) + 1
    deadline = waiting.batch_deadline(rt.store, job.batch_id)
    where = SYNC if force_sync else after_unanswered(
        expiries - 1, rt.config.provider_batch.max_expiries, time.time(), deadline)
    # Why, on the job: `results` and the report can say where it went and why.
    options = dict(job.options) | {"batch_expiries": expiries,
                                   "batch_unanswered": f"{why} (provider batch {pb.id})"[:300]}
    if where == SYNC:
        rt.budget.settle(_hold_of(job), 0.0)
        options = _drop_hold(options) | {"sync": True}
        if rt.store.transition(job.id, job.attempt_no, state=QUEUED, options=options,
                               provider_batch_id=None):
            rt.dispatcher.enqueue(job.id, job.attempt_no, rt.config.providers[job.provider].queue)
    else:
        rt.store.transition(job.id, job.attempt_no, state=BATCHED, options=options,
                            provider_batch_id=None)
    plog.info("provider_batch_request_unanswered", job_id=job.id, reason=why,
              sent_to="synchronous" if where == SYNC else "next provider batch")


def _give_up(rt: Runtime, pb: ProviderBatch, why: str, note: str = "",
             state: str = "done") -> None:
    """The provider batch will not (or no longer) be waited for: every job it holds runs
    synchronously, with `why` on it, and the row ends in `state`."""
    jobs = spb.claim(rt.store, pb.id, [(j.id, j.attempt_no) for j in spb.jobs_of(rt.store, pb.id)])
    for job in jobs:
        _send_on(rt, job, pb, why, force_sync=True, plog=log.bind(provider_batch=pb.id))
    spb.set_fields(rt.store, pb.id, state=state, ended_at=utcnow(),
                   **({"note": note} if note else {}))


def _record_discarded(rt: Runtime, job: Job, model: ModelConfig,
                      completion: Completion) -> None:
    """The Attempt of an answer billed for a job cancelled meanwhile; the job moves to
    the next attempt number, so a `resume` never collides with this row."""
    charge = _charge(rt, job, model, completion)
    rt.budget.settle(_hold_of(job), charge.cost_usd)
    recorded = rt.store.record_attempt(Attempt(
        job_id=job.id, batch_id=job.batch_id, attempt_no=job.attempt_no, task=job.task,
        tier=model.tier, provider=model.provider, model=model.name,
        prompt_tokens=charge.usage.prompt_tokens,
        completion_tokens=charge.usage.completion_tokens,
        cost_usd=charge.cost_usd, outcome=DISCARDED, flags=charge.flags_text,
        reason="job cancelled while its provider batch ran; the provider answered (and "
               "billed) it anyway, the answer is discarded"))
    spb.settle_cancelled(rt.store, job.id, job.attempt_no, _without_hold(job).options,
                         next_attempt=recorded)


def _parse_time(value: Any) -> datetime | None:
    """A reply's timestamp (Unix seconds or ISO 8601), or None for anything else: a
    hostile 1e300, NaN or "year 99999" must not raise out of the tick."""
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return datetime.fromtimestamp(value, UTC)
        if isinstance(value, str):
            return waiting.aware(datetime.fromisoformat(value[:64].replace("Z", "+00:00")))
    except (ValueError, OverflowError, OSError):
        return None
    return None
