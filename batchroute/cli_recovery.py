"""`batchroute cancel | resume | recover`: stopping a batch and finishing an interrupted one.

Kept apart from cli.py so the recovery verbs and their wording live next to each
other; cli.py registers them on the main group. All three only move jobs in the
SQL store with guarded UPDATEs and publish ids, so they are safe to run while
workers are busy, and to run twice.
"""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console

from batchroute.store import Batch, Store

console = Console(stderr=True)


def find_batch_or_fail(store: Store, ref: str) -> Batch:
    batch = store.find_batch(ref)
    if batch is None:
        raise click.ClickException(f"no batch {ref!r} in {store.engine.url!r}; "
                                   "`batchroute submit FILE` prints the batch id")
    return batch


def _dispatcher() -> Any:
    from batchroute.dispatch import CeleryDispatcher

    return CeleryDispatcher()


def _broker() -> Any:
    from batchroute.broker import broker_url
    from batchroute.recovery import broker_view

    return broker_view(broker_url())


def _broker_error(e: Exception) -> click.ClickException:
    return click.ClickException(f"cannot reach the broker ({e}); is Redis running at "
                                "$BATCHROUTE_BROKER_URL? Nothing is lost: run this again "
                                "once it is back")


def _emit(data: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        console.print(text)
        for note in data.get("notes", []):
            console.print(f"[yellow]note:[/yellow] {note}", highlight=False)


@click.command()
@click.argument("batch")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def cancel(batch: str, as_json: bool) -> None:
    """Stop BATCH: queued and running jobs become cancelled; finished jobs keep their results.

    A call already in flight finishes and is billed, but its answer is discarded.
    `batchroute resume BATCH` runs the cancelled jobs later.
    """
    from batchroute.recovery import cancel_batch

    store = Store()
    b = find_batch_or_fail(store, batch)
    counts = cancel_batch(store, b.id)
    _emit({"batch_id": b.id, **counts}, as_json,
          f"batch {b.id}: {counts['cancelled_queued']} queued and "
          f"{counts['cancelled_running']} running job(s) cancelled")


@click.command()
@click.argument("batch")
@click.option("--reclaim-running", is_flag=True,
              help="Treat the batch's running jobs as dead now instead of when their lease "
                   "ends. Only when no worker is running them.")
@click.option("--budget-usd", type=click.FloatRange(min=0), default=None,
              help="The batch's new budget: jobs that ended budget_exhausted run again "
                   "under it.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
@click.pass_obj
def resume(obj: Any, batch: str, reclaim_running: bool, budget_usd: float | None,
           as_json: bool) -> None:
    """Finish BATCH after an interruption (cancel, killed workers, broker restart, a submit
    cut short); finished jobs are never run again."""
    from kombu.exceptions import OperationalError

    from batchroute.recovery import resume_batch

    store = Store()
    b = find_batch_or_fail(store, batch)
    try:
        data = resume_batch(store, obj.config, _dispatcher(), b, broker=_broker(),
                            reclaim_running=reclaim_running, budget_usd=budget_usd)
    except (OSError, OperationalError) as e:
        raise _broker_error(e) from None
    _emit(data, as_json, resume_text(data))


def resume_text(data: dict[str, Any]) -> str:
    """What `resume` did, in words: jobs stopped by the budget are told apart from jobs the
    user cancelled, with the budget they now run under."""
    parts = [f"{data['ingested']} line(s) ingested"]
    if data.get("reopened_cancelled", data["reopened"]) or not data.get("reopened_budget"):
        parts.append(f"{data.get('reopened_cancelled', data['reopened'])} cancelled job(s) "
                     "reopened")
    if data.get("reopened_budget"):
        budget = data.get("budget_usd")
        parts.append(f"{data['reopened_budget']} job(s) cancelled by the budget reopened "
                     + (f"with budget ${budget:g}" if budget is not None else "with no budget"))
    parts.append(f"{data['dead_requeued']} dead run(s) requeued")
    parts.append(f"{data['republished']} job(s) published ({data['held_by_broker']} already "
                 "queued)")
    return f"batch {data['batch_id']}: " + ", ".join(parts)


@click.command()
@click.argument("batch", required=False)
@click.option("--stale-after", type=float, default=None,
              help="Seconds a queued job may go untouched before its message is presumed "
                   "lost (default $BATCHROUTE_STALE_QUEUED_S or 600).")
@click.option("--max-lost", type=int, default=None,
              help="Dead runs after which a job fails with worker_lost "
                   "(default $BATCHROUTE_MAX_LOST or 3).")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
@click.pass_obj
def recover(obj: Any, batch: str | None, stale_after: float | None, max_lost: int | None,
            as_json: bool) -> None:
    """Run the sweeper once, for BATCH or for every batch: jobs whose worker died go back
    to the queue, jobs whose broker message was lost are published again.

    `celery -A workers beat` runs the same sweep every $BATCHROUTE_SWEEP_INTERVAL_S seconds.
    """
    from kombu.exceptions import OperationalError

    from batchroute.recovery import sweep

    store = Store()
    batch_id = find_batch_or_fail(store, batch).id if batch else None
    try:
        report = sweep(store, obj.config, _dispatcher(), batch_id=batch_id,
                       stale_after_s=stale_after, max_lost=max_lost, broker=_broker())
    except (OSError, OperationalError) as e:
        raise _broker_error(e) from None
    data = {"batch_id": batch_id, **report.as_dict()}
    _emit(data, as_json,
          f"{report.dead_requeued} dead run(s) requeued, {report.dead_failed} failed "
          f"(worker_lost), {report.republished} lost message(s) republished, "
          f"{report.held_by_broker} still queued in the broker"
          + (" — broker unreadable, nothing republished" if report.broker_unreadable else ""))
