"""The `batchroute` command line (click + rich).

Every command that reports something takes `--json` for scripts; every error
says what to do next. Logs go to stderr at WARNING unless --verbose, so
progress bars and tables stay readable.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from batchroute.cli_errors import FriendlyGroup
from batchroute.cli_options import (
    deadline_option,
    provider_batch_option,
    reuse_mode,
    reuse_option,
)
from batchroute.cli_outcome import (
    FAILED_EXIT,
    exit_code,
    failed_warning,
    report_warnings,
    simulated_note,
)
from batchroute.cli_recovery import cancel, recover, resume
from batchroute.cli_recovery import find_batch_or_fail as _batch
from batchroute.cli_tables import (
    console,
    out,
    show_pools,
    show_problems,
    show_provider_batches,
    show_report,
)
from batchroute.config import Config, ConfigError, load_config
from batchroute.logs import configure_logging
from batchroute.store import FINISHED, Batch, Store
from batchroute.terminal import for_rich


class Ctx:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load_config(self.config_path)
            except ConfigError as e:
                raise click.ClickException(f"config: {e}") from None
        return self._config


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console,
                    transient=False)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="BATCHROUTE_CONFIG", type=click.Path(),
              help="Routing config TOML (default: $BATCHROUTE_CONFIG, else the built-in "
                   "simulator config).")
@click.option("-v", "--verbose", is_flag=True, help="Show INFO logs on stderr.")
@click.option("--debug", is_flag=True, envvar="BATCHROUTE_DEBUG",
              help="Show the full traceback of configuration and connection errors "
                   "(default: one line saying what to do; also BATCHROUTE_DEBUG=1).")
@click.version_option(package_name="batchroute")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, verbose: bool, debug: bool) -> None:
    """Run large batches of LLM requests on the cheapest model tier that gives acceptable
    answers.

    \b
    Quick start (no Redis, no API keys):
      batchroute run jobs/examples/support_batch.jsonl -o out.jsonl
    Distributed (Redis + Celery workers):
      celery -A workers worker          # in another terminal
      batchroute submit batch.jsonl     # prints BATCH
      batchroute status BATCH --watch
      batchroute results BATCH -o out.jsonl --errors errors.jsonl
      batchroute report BATCH
    """
    # Every condition a command meets is in its own output (bad lines, republished
    # messages, budget stops), so its log lines would only repeat them: the CLI logs
    # errors only, always to stderr, unless -v or BATCHROUTE_LOG_LEVEL asks for more.
    configure_logging(level="INFO" if verbose else os.environ.get("BATCHROUTE_LOG_LEVEL")
                      or "ERROR")
    ctx.obj = Ctx(config_path)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write results (OpenAI batch output format).")
@click.option("--errors", type=click.Path(dir_okay=False, path_type=Path),
              help="Write failed jobs and bad lines here instead of into --output.")
@click.option("--report-json", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the report as JSON to this path.")
@click.option("--concurrency", default=16, show_default=True, help="Jobs in flight at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--strict", is_flag=True,
              help="Refuse the whole file on its first bad line (nothing is run).")
@click.option("--budget-usd", type=click.FloatRange(min=0), default=None,
              help="Spend at most this much on the batch; jobs past it end budget_exhausted "
                   "(run again with a higher --budget-usd to finish them).")
@click.option("--fail-on-failed", is_flag=True,
              help=f"Exit with code {FAILED_EXIT} when any job failed (a warning is printed "
                   "either way).")
@deadline_option
@reuse_option
@provider_batch_option
@click.pass_obj
def run(obj: Ctx, file: Path, output: Path, errors: Path | None, report_json: Path | None,
        concurrency: int, as_json: bool, strict: bool, budget_usd: float | None,
        fail_on_failed: bool, deadline: float, reuse: bool | None,
        provider_batch: bool | None) -> None:
    """Run FILE start to finish in this process (SQLite file, no Redis needed)."""
    from batchroute.embedded import run_file
    from batchroute.ingest import BatchInputError

    with _progress() as progress:
        bar = progress.add_task("jobs", total=None, detail="")

        def ingested(result: Any) -> None:
            progress.update(bar, total=result.jobs, description=f"batch {result.batch_id}")
            if result.problem_count:
                show_problems(result.problems, result.problem_count)

        def advance(counts: dict[str, int]) -> None:
            done = sum(counts.get(s, 0) for s in FINISHED)
            progress.update(bar, completed=done,
                            detail=f"ok {counts.get('succeeded', 0)} failed "
                                   f"{counts.get('failed', 0)}")

        try:
            outcome = run_file(file, output, errors, obj.config, concurrency=concurrency,
                               on_ingested=ingested, on_progress=advance, strict=strict,
                               budget_usd=budget_usd, deadline_s=deadline,
                               reuse_mode=reuse_mode(reuse), provider_batch=provider_batch)
        except (ConfigError, BatchInputError) as e:
            raise click.ClickException(str(e)) from None
    if report_json:
        report_json.write_text(json.dumps(outcome.report, indent=2))
    if as_json:
        _print_json(outcome.report)
    else:
        show_report(outcome.report)
        console.print(f"results: {output} ({outcome.written.written} lines)"
                      + (f", errors: {errors or output} ({outcome.written.errors} lines)"
                         if outcome.written.errors else ""))
    for line in [simulated_note(obj.config), *report_warnings(outcome.report,
                                                             str(errors or output))]:
        if line:
            console.print(f"[yellow]{line}[/yellow]", highlight=False)
    sys.exit(exit_code(int(outcome.report.get("failed") or 0), fail_on_failed))


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="A readable name for the batch (default: the file name).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--strict", is_flag=True,
              help="Refuse the whole file on its first bad line (nothing is stored).")
@click.option("--budget-usd", type=click.FloatRange(min=0), default=None,
              help="Spend at most this much on the batch; jobs past it end budget_exhausted "
                   "(finish them with `batchroute resume BATCH --budget-usd N`, N higher).")
@deadline_option
@reuse_option
@provider_batch_option
@click.pass_obj
def submit(obj: Ctx, file: Path, name: str | None, as_json: bool, strict: bool,
           budget_usd: float | None, deadline: float, reuse: bool | None,
           provider_batch: bool | None) -> None:
    """Store FILE's jobs and put them on the queues; prints the batch id.

    Submitting the same file again finds the same batch and adds nothing twice.
    """
    from kombu.exceptions import OperationalError

    from batchroute.dispatch import CeleryDispatcher
    from batchroute.ingest import BatchInputError, count_lines, file_batch_id, ingest_file

    store = Store()
    existing = store.find_batch(file_batch_id(file))
    try:
        with _progress() as progress:
            bar = progress.add_task("submitting", total=count_lines(file), detail="")
            result = ingest_file(obj.config, store, CeleryDispatcher(), file, name,
                                 progress=lambda n: progress.advance(bar, n), strict=strict,
                                 budget_usd=budget_usd, deadline_s=deadline,
                                 reuse_mode=reuse_mode(reuse),
                                 provider_batch=provider_batch)
    except BatchInputError as e:
        raise click.ClickException(str(e)) from None
    except (OSError, OperationalError) as e:  # broker down
        raise click.ClickException(
            f"cannot reach the broker ({e}); is Redis running at $BATCHROUTE_BROKER_URL? "
            f"The jobs stored so far are safe: `batchroute resume {file_batch_id(file)}` "
            "finishes the submission once the broker is back") from None
    if result.problem_count and not as_json:
        show_problems(result.problems, result.problem_count)
    already = _already_submitted(store, existing, result.batch_id, result.enqueued)
    if as_json:
        _print_json({"batch_id": result.batch_id, "lines": result.lines, "jobs": result.jobs,
                     "enqueued": result.enqueued, "bad_lines": result.problem_count,
                     "already_existed": existing is not None, "note": already,
                     "problems": [{"line": n, "reason": r} for n, r in result.problems]})
    else:
        if already:
            console.print(f"[yellow]{already}[/yellow]", highlight=False)
        else:
            console.print(f"{result.jobs} jobs stored, {result.enqueued} enqueued")
        click.echo(result.batch_id)


def _already_submitted(store: Store, existing: Batch | None, batch_id: str,
                       enqueued: int) -> str | None:
    """What to say when a submit stored and enqueued nothing because this file's batch was
    already in the database (the quick start's `run` wrote it, or an earlier submit)."""
    if existing is None or enqueued:
        return None
    from batchroute.batch_status import status_data

    data = status_data(store, existing)
    return (f"0 enqueued: batch {batch_id} already exists in {store.engine.url!r} "
            f"({data['state']}, {data['done']}/{data['jobs']} jobs ended; from "
            f"{existing.source or existing.name}): nothing was stored. Its results: "
            f"`batchroute results {batch_id} -o out.jsonl`; to run the file again, use a new "
            "database (BATCHROUTE_DATABASE_URL) or `batchroute resume` to finish it")


def _status_data(store: Store, batch: Batch) -> dict[str, Any]:
    from batchroute.batch_status import status_data

    return status_data(store, batch)


def _stalls(obj: Ctx, store: Store, batch: Batch) -> dict[str, Any]:
    """Stalled jobs of the batch and what to run (see batchroute.batch_status)."""
    from batchroute.batch_status import find_stalls
    from batchroute.cli_recovery import _broker

    try:
        queues = [p.queue for p in obj.config.providers.values()]
    except click.ClickException:  # an unreadable config must not hide the batch
        queues = []
    return find_stalls(store, queues, _broker(), batch.id).as_dict(batch.id)


@main.command()
@click.argument("batch")
@click.option("--watch", is_flag=True, help="Follow progress until the batch is done.")
@click.option("--json", "as_json", is_flag=True, help="Print status as JSON.")
@click.option("--fail-on-failed", is_flag=True,
              help=f"Exit with code {FAILED_EXIT} when any job failed (a warning is printed "
                   "either way).")
@click.pass_obj
def status(obj: Ctx, batch: str, watch: bool, as_json: bool, fail_on_failed: bool) -> None:
    """Show how far BATCH has got, and each rate-limit pool's use against its limits."""
    store = Store()
    b = _batch(store, batch)
    data = _status_data(store, b)
    stalls = _stalls(obj, store, b) if data["done"] < data["jobs"] else None
    if watch and not as_json:
        shown: str | None = None
        checked = time.monotonic()
        with _progress() as progress:
            bar = progress.add_task(f"batch {for_rich(b.id)}", total=data["jobs"], detail="")
            while True:
                data = _status_data(store, b)
                c = data["counts"]
                if time.monotonic() - checked >= 10 and data["done"] < data["jobs"]:
                    stalls, checked = _stalls(obj, store, b), time.monotonic()
                n_stalled = stalls["count"] if stalls else 0
                progress.update(bar, completed=data["done"], total=data["jobs"],
                                detail=f"ok {c.get('succeeded', 0)} failed {c.get('failed', 0)}"
                                + (f" [red]stalled {n_stalled}[/red]" if n_stalled else ""))
                if stalls and stalls["advice"] and stalls["advice"] != shown:
                    shown = stalls["advice"]
                    progress.console.print(f"[yellow]{shown}[/yellow]", highlight=False)
                if data["done"] >= data["jobs"]:
                    break
                time.sleep(0.5)
        stalls = None if data["done"] >= data["jobs"] else stalls
    data["stalled"] = stalls or {"count": 0, "advice": None}
    data["pools"], pools_problem = _pools(obj)
    if pools_problem:
        data["pools_error"] = pools_problem
    failed = data["counts"].get("failed", 0)
    if as_json:
        _print_json(data)
        sys.exit(exit_code(failed, fail_on_failed))
    table = Table(title=f"batch {for_rich(b.id)} ({for_rich(b.name)})")
    table.add_column("state")
    table.add_column("jobs", justify="right")
    table.add_row(f"[bold]batch: {data['state']}[/bold]", "")
    for state, n in sorted(data["counts"].items()):
        table.add_row(state, str(n))
    table.add_row("bad lines", str(data["bad_line_count"]))
    if data["stalled"]["count"]:
        table.add_row("[red]stalled[/red]", str(data["stalled"]["count"]))
    out.print(table)
    show_provider_batches(data["provider_batches"])
    if data["stalled"]["advice"]:
        console.print(f"[yellow]{data['stalled']['advice']}[/yellow]", highlight=False)
    elif data["stalled"].get("broker_unreadable"):
        console.print("[yellow]the broker could not be inspected: queued jobs whose message "
                      "was lost cannot be told apart (is Redis running at "
                      "$BATCHROUTE_BROKER_URL?)[/yellow]", highlight=False)
    warning = failed_warning(failed, data["jobs"], b.id, None)
    if warning:
        console.print(f"[yellow]{warning}[/yellow]", highlight=False)
    show_pools(data["pools"], pools_problem)
    sys.exit(exit_code(failed, fail_on_failed))


def _pools(obj: Ctx) -> tuple[list[dict[str, Any]], str | None]:
    from batchroute.ratelimit import pool_status

    try:
        return pool_status(obj.config)
    except click.ClickException as e:  # an unreadable config must not hide the batch
        return [], e.message


@main.command()
@click.argument("batch")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--errors", type=click.Path(dir_okay=False, path_type=Path),
              help="Write failed jobs and bad lines here instead of into --output.")
@click.option("--fail-on-failed", is_flag=True,
              help=f"Exit with code {FAILED_EXIT} when any job failed (a warning is printed "
                   "either way).")
def results(batch: str, output: Path, errors: Path | None, fail_on_failed: bool) -> None:
    """Write BATCH's results (OpenAI batch output format plus a `batchroute` field)."""
    from batchroute.results import write_results

    store = Store()
    b = _batch(store, batch)
    summary = write_results(store, b.id, output, errors)
    console.print(f"{summary.written} results to {output}, {summary.errors} errors to "
                  f"{errors or output}" + (f"; {summary.unfinished} jobs not finished yet"
                                           if summary.unfinished else ""))
    failed = store.state_counts(b.id).get("failed", 0)
    warning = failed_warning(failed, summary.written + failed, b.id, str(errors or output))
    if warning:
        console.print(f"[yellow]{warning}[/yellow]", highlight=False)
    sys.exit(exit_code(failed, fail_on_failed))


@main.command()
@click.argument("batch")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a self-contained HTML report with charts to this path.")
@click.pass_obj
def report(obj: Ctx, batch: str, as_json: bool, html_path: Path | None) -> None:
    """What BATCH spent, what it saved against its reference models, and where jobs ended."""
    from batchroute.reports import batch_report

    store = Store()
    data = batch_report(store, obj.config, _batch(store, batch).id)
    if html_path is not None:
        from batchroute.html_report import render_html
        from batchroute.results import atomic_writer

        with atomic_writer(html_path) as f:
            f.write(render_html(data))
        console.print(f"HTML report: {html_path}")
    if as_json:
        _print_json(data)
    else:
        show_report(data)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--completion-ratio", type=click.FloatRange(0, 1), default=0.25,
              show_default=True,
              help="Answer tokens as a share of max_tokens, for tasks with no history.")
@click.option("--prior-pass-rate", type=click.FloatRange(0, 1), default=0.8,
              show_default=True,
              help="Share of answers a tier passes, where the store has no history.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
@click.pass_obj
def estimate(obj: Ctx, file: Path, completion_ratio: float, prior_pass_rate: float,
             as_json: bool) -> None:
    """Dry run: tokens and predicted cost of FILE per tier, routed, and for the baseline.

    Nothing is stored or called. Pass rates and answer lengths come from the store's
    history of earlier batches when it has enough.
    """
    from batchroute.estimate import Assumptions, estimate_file

    data = estimate_file(obj.config, file, Store(),
                         Assumptions(completion_ratio=completion_ratio,
                                     prior_pass_rate=prior_pass_rate))
    if as_json:
        _print_json(data)
        return
    if data["bad_lines"]:
        show_problems([(p["line"], p["reason"]) for p in data["problems"]], data["bad_lines"])
    t = Table(title=f"estimate for {file.name}: {data['jobs']} jobs", show_header=False)
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    rc = data["routed_cost_usd"]
    for k, v in [("prompt tokens", f"{data['prompt_tokens']:,}"),
                 ("answer tokens (expected / max)",
                  f"{data['completion_tokens_expected']:,} / {data['completion_tokens_max']:,}"),
                 *((f"all on tier {k} ({v['model']})", f"${v['cost_usd']:.4f}")
                   for k, v in data["per_tier"].items()),
                 ("routed: expected", f"${rc['expected']:.4f}"),
                 ("routed: range", f"${rc['low']:.4f} – ${rc['high']:.4f}"),
                 ("baseline (reference models)", f"${data['baseline_cost_usd']:.4f}"),
                 ("expected savings", f"{data['expected_savings_pct']:.1f}%"),
                 ("answer tokens from", data["assumptions"]["answer_tokens"]),
                 ("pass rates from", data["assumptions"]["pass_rates"])]:
        t.add_row(k, str(v))
    out.print(t)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8787, show_default=True)
@click.option("--replay", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Answer with the recorded answers of this replay JSONL file "
                   "(overrides [simulator] replay).")
@click.pass_obj
def sim(obj: Ctx, host: str, port: int, replay: Path | None) -> None:
    """Serve the simulated provider (OpenAI- and Anthropic-compatible) over HTTP.

    Its behaviour comes from the config's [simulator] section; point a provider's
    base_url at http://HOST:PORT/v1 to use it from workers. In replay mode it answers
    only the recorded prompts, with the recorded answers and token usage.
    """
    from batchroute.sim import SimConfig, SimConfigError, serve_forever

    settings = dict(obj.config.simulator)
    if replay is not None:
        settings["replay"] = str(replay.resolve())
    try:
        sim_config = SimConfig.from_dict(settings)
    except SimConfigError as e:
        raise click.ClickException(str(e)) from None
    console.print(f"simulated provider on http://{host}:{port}/v1 (Ctrl-C to stop)"
                  + (f", replaying {sim_config.replay}" if sim_config.replay else ""))
    try:
        serve_forever(sim_config, host, port)
    except SimConfigError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        sys.exit(0)


@main.command()
@click.argument("train", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the calibrated routing config (TOML).")
@click.option("--target", default=None,
              help="best-accuracy (default: at least the reference model's accuracy, out "
                   "of fold, within --tolerance), an accuracy such as 0.9, or a share of the "
                   "reference's such as 95%.")
@click.option("--max-cost-usd", type=float, default=None,
              help="Instead of an accuracy target: mean USD per query, at best accuracy.")
@click.option("--max-rungs", default=3, show_default=True, help="Longest ladder to consider.")
@click.option("--cv", "cv_folds", default=5, show_default=True,
              help="Folds to choose ladder length and safety margin by cross-validation "
                   "on TRAIN (0: no cross-validation).")
@click.option("--seed", default=0, show_default=True, help="Seed of the cross-validation folds.")
@click.option("--scorer/--no-scorer", "use_scorer", default=None,
              help="Also try learned per-query scorers at each cheap rung: a logistic "
                   "regression of P(answer correct | prompt, answer), fitted on TRAIN "
                   "(needs scikit-learn: pip install 'batchroute[calibrate]'). Its weights "
                   "are written next to OUTPUT, in OUTPUT's name + .scorers/. Default: on "
                   "when scikit-learn is installed; cross-validation keeps a scorer only "
                   "where it validates (benchmarks/README.md).")
@click.option("--scorer-folds", default=5, show_default=True,
              help="Inner folds giving the out-of-fold scores scorer thresholds are "
                   "chosen on.")
@click.option("--reference", default=None,
              help="The model accuracy is held against and savings reported against; the "
                   "top rung of every ladder. Default: the records' requested model (the "
                   "most common), else the most accurate single model on TRAIN.")
@click.option("--free-top", is_flag=True,
              help="Let a ladder end on another model than the reference (any model).")
@click.option("--tolerance", default=0.003, show_default=True,
              help="Accuracy a policy may lose to the reference, out of fold, as a share "
                   "(0.003 = 0.3 points).")
@click.option("--confidence", default=0.75, show_default=True,  # calibrate.DEFAULT_CONFIDENCE
              help="One-sided confidence of the paired lower bound a policy must clear.")
@click.option("--agree/--no-agree", "try_agree", default=True, show_default=True,
              help="Let a rung keep its answer when it agrees with the rungs' below "
                   "(validator `agree`).")
@click.option("--answer-in/--no-answer-in", "try_answer_in", default=True, show_default=True,
              help="Let a rung keep only the labels its model is most often right on "
                   "(validator `answer_in`; label-like answers only).")
@click.option("--json", "as_json", is_flag=True, help="Print the calibration as JSON.")
@click.pass_obj
def calibrate(obj: Ctx, train: Path, output: Path, target: str | None,
              max_cost_usd: float | None, max_rungs: int, cv_folds: int, seed: int,
              use_scorer: bool | None, scorer_folds: int, reference: str | None,
              free_top: bool, tolerance: float, confidence: float, try_agree: bool,
              try_answer_in: bool, as_json: bool) -> None:
    """Fit the cheapest routing policy that meets a target on TRAIN, a labelled replay file.

    The routing config (--config) prices the models and lists the checks each task may
    use; the policy (ladder, checks per rung, consensus samples and votes, learned
    scorer thresholds) is written as a routing config to run with:
    batchroute --config OUTPUT run BATCH -o OUT. Learned scorers are JSON weight files
    in OUTPUT.scorers/ (applied in pure Python at run time: no scikit-learn needed).
    Only TRAIN is read: evaluate the result on queries it has not seen.
    """
    from batchroute import calibrate as cal
    from batchroute.replay import ReplayFormatError, load_records
    from batchroute.scorer import ScorerError, sklearn_available

    if use_scorer is None:
        use_scorer = sklearn_available()
        if not use_scorer:
            click.echo("note: learned scorers not tried: scikit-learn is not installed "
                       "(pip install 'batchroute[calibrate]', or --no-scorer to silence "
                       "this)", err=True)
    try:
        records = load_records(train)
        result = cal.calibrate(records, obj.config,
                               cal.Target.parse(target, max_cost_usd, tolerance=tolerance,
                                                confidence=confidence),
                               max_rungs=max_rungs, source=str(train), cv_folds=cv_folds,
                               seed=seed, scorer_folds=scorer_folds if use_scorer else 0,
                               reference=reference, free_top=free_top, try_agree=try_agree,
                               try_answer_in=try_answer_in)
        data = cal.policy_config(result, obj.config, cal.load_raw_config(obj.config),
                                 scorer_dir=cal.scorer_dir_for(output), base=output.parent)
        output.write_text(cal.to_toml(data, cal.header(result)), "utf-8")
    except (cal.CalibrationError, ReplayFormatError, ScorerError, OSError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        _print_json(result.to_dict() | {"output": str(output)})
        return
    for line in cal.header(result).splitlines()[1:]:
        click.echo(line.removeprefix("# "), err=True)
    click.echo(f"wrote {output}", err=True)


main.add_command(cancel)
main.add_command(resume)
main.add_command(recover)

if __name__ == "__main__":  # pragma: no cover
    main()
