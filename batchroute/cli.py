"""The `batchroute` command line (click + rich).

Every command that reports something takes `--json` for scripts; every error
says what to do next. Logs go to stderr at WARNING unless --verbose, so
progress bars and tables stay readable.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from batchroute.config import Config, ConfigError, load_config
from batchroute.logs import configure_logging
from batchroute.store import FINISHED, Batch, Store

console = Console(stderr=True)
out = Console()


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


def _batch(store: Store, ref: str) -> Batch:
    batch = store.find_batch(ref)
    if batch is None:
        raise click.ClickException(f"no batch {ref!r} in {store.engine.url!r}; "
                                   "`batchroute submit FILE` prints the batch id")
    return batch


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console,
                    transient=False)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="BATCHROUTE_CONFIG", type=click.Path(),
              help="Routing config TOML (default: $BATCHROUTE_CONFIG, else the built-in "
                   "simulator config).")
@click.option("-v", "--verbose", is_flag=True, help="Show INFO logs on stderr.")
@click.version_option(package_name="batchroute")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, verbose: bool) -> None:
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
    configure_logging(level="INFO" if verbose else "WARNING")
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
@click.pass_obj
def run(obj: Ctx, file: Path, output: Path, errors: Path | None, report_json: Path | None,
        concurrency: int, as_json: bool) -> None:
    """Run FILE start to finish in this process (SQLite file, no Redis needed)."""
    from batchroute.embedded import run_file

    with _progress() as progress:
        bar = progress.add_task("jobs", total=None, detail="")

        def ingested(result: Any) -> None:
            progress.update(bar, total=result.jobs, description=f"batch {result.batch_id}")
            if result.problem_count:
                _show_problems(result.problems, result.problem_count)

        def advance(counts: dict[str, int]) -> None:
            done = sum(counts.get(s, 0) for s in FINISHED)
            progress.update(bar, completed=done,
                            detail=f"ok {counts.get('succeeded', 0)} failed "
                                   f"{counts.get('failed', 0)}")

        try:
            outcome = run_file(file, output, errors, obj.config, concurrency=concurrency,
                               on_ingested=ingested, on_progress=advance)
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
    if report_json:
        report_json.write_text(json.dumps(outcome.report, indent=2))
    if as_json:
        _print_json(outcome.report)
    else:
        _show_report(outcome.report)
        console.print(f"results: {output} ({outcome.written.written} lines)"
                      + (f", errors: {errors or output} ({outcome.written.errors} lines)"
                         if outcome.written.errors else ""))


def _show_problems(problems: list[tuple[int, str]], total: int) -> None:
    console.print(f"[yellow]{total} line(s) rejected; the other lines go on:[/yellow]")
    for line_no, reason in problems[:20]:
        console.print(f"  line {line_no}: {reason}", markup=False, highlight=False)
    if total > 20:
        console.print(f"  ... and {total - 20} more (see `batchroute status BATCH --json`)")


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="A readable name for the batch (default: the file name).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def submit(obj: Ctx, file: Path, name: str | None, as_json: bool) -> None:
    """Store FILE's jobs and put them on the queues; prints the batch id.

    Submitting the same file again finds the same batch and adds nothing twice.
    """
    from batchroute.dispatch import CeleryDispatcher
    from batchroute.ingest import ingest_file

    store = Store()
    try:
        with _progress() as progress:
            bar = progress.add_task("submitting", total=None, detail="")
            result = ingest_file(obj.config, store, CeleryDispatcher(), file, name,
                                 progress=lambda n: progress.advance(bar, n))
    except OSError as e:  # broker down
        raise click.ClickException(f"cannot reach the broker ({e}); is Redis running at "
                                   "$BATCHROUTE_BROKER_URL?") from None
    if result.problem_count and not as_json:
        _show_problems(result.problems, result.problem_count)
    if as_json:
        _print_json({"batch_id": result.batch_id, "lines": result.lines, "jobs": result.jobs,
                     "enqueued": result.enqueued, "bad_lines": result.problem_count,
                     "problems": [{"line": n, "reason": r} for n, r in result.problems]})
    else:
        console.print(f"{result.jobs} jobs stored, {result.enqueued} enqueued")
        click.echo(result.batch_id)


def _status_data(store: Store, batch: Batch) -> dict[str, Any]:
    counts = store.state_counts(batch.id)
    total = sum(counts.values())
    return {"batch_id": batch.id, "name": batch.name, "state": batch.state, "jobs": total,
            "counts": counts, "done": sum(counts.get(s, 0) for s in FINISHED),
            "bad_lines": [{"line": e.line_no, "custom_id": e.custom_id, "reason": e.reason}
                          for e in store.line_errors(batch.id)[:100]]}


@main.command()
@click.argument("batch")
@click.option("--watch", is_flag=True, help="Follow progress until the batch is done.")
@click.option("--json", "as_json", is_flag=True, help="Print status as JSON.")
def status(batch: str, watch: bool, as_json: bool) -> None:
    """Show how far BATCH has got."""
    store = Store()
    b = _batch(store, batch)
    data = _status_data(store, b)
    if watch and not as_json:
        with _progress() as progress:
            bar = progress.add_task(f"batch {b.id}", total=data["jobs"], detail="")
            while True:
                data = _status_data(store, b)
                c = data["counts"]
                progress.update(bar, completed=data["done"],
                                detail=f"ok {c.get('succeeded', 0)} failed {c.get('failed', 0)}")
                if data["done"] >= data["jobs"]:
                    break
                time.sleep(0.5)
    if as_json:
        _print_json(data)
        return
    table = Table(title=f"batch {b.id} ({b.name})")
    table.add_column("state")
    table.add_column("jobs", justify="right")
    for state, n in sorted(data["counts"].items()):
        table.add_row(state, str(n))
    table.add_row("bad lines", str(b.error_lines))
    out.print(table)


@main.command()
@click.argument("batch")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--errors", type=click.Path(dir_okay=False, path_type=Path),
              help="Write failed jobs and bad lines here instead of into --output.")
def results(batch: str, output: Path, errors: Path | None) -> None:
    """Write BATCH's results (OpenAI batch output format plus a `batchroute` field)."""
    from batchroute.results import write_results

    store = Store()
    b = _batch(store, batch)
    summary = write_results(store, b.id, output, errors)
    console.print(f"{summary.written} results to {output}, {summary.errors} errors to "
                  f"{errors or output}" + (f"; {summary.unfinished} jobs not finished yet"
                                           if summary.unfinished else ""))


@main.command()
@click.argument("batch")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_obj
def report(obj: Ctx, batch: str, as_json: bool) -> None:
    """What BATCH spent, what it saved against its reference models, and where jobs ended."""
    from batchroute.reports import batch_report

    store = Store()
    data = batch_report(store, obj.config, _batch(store, batch).id)
    if as_json:
        _print_json(data)
    else:
        _show_report(data)


def _show_report(r: dict[str, Any]) -> None:
    head = Table(title=f"batch {r['batch_id']} — {r['name']}", show_header=False)
    head.add_column("", style="bold")
    head.add_column("", justify="right")
    rows = [("jobs", r["jobs"]), ("succeeded", r["succeeded"]), ("failed", r["failed"]),
            ("pending", r["pending"]), ("bad lines", r["bad_lines"]),
            ("attempts", r["attempts"]), ("cost", f"${r['cost_usd']:.4f}"),
            ("baseline (reference models)", f"${r['baseline_cost_usd']:.4f}"),
            ("savings", f"{r['savings_pct']:.1f}%"),
            ("escalation rate", f"{100 * r['escalation_rate']:.1f}%"),
            ("cost per success", f"${r['cost_per_success_usd']:.6f}"
             if r["cost_per_success_usd"] is not None else "-")]
    res = r.get("resilience") or {}
    if res.get("provider_errors") or res.get("failovers"):
        rows.append(("provider errors", ", ".join(f"{k} {v}" for k, v in
                                                  res["provider_errors"].items()) or "0"))
        rows.append(("retries / failovers", f"{res['retries']} / {res['failovers']}"))
    for k, v in rows:
        head.add_row(k, str(v))
    out.print(head)
    for key in ("by_tier", "by_model", "by_task"):
        t = Table(title=key.replace("_", " "))
        for col in ("", "jobs", "succeeded", "attempts", "tokens", "cost"):
            t.add_column(col, justify="left" if not col else "right")
        for name, b in r[key].items():
            t.add_row(name, str(b["jobs"]), str(b["succeeded"]), str(b["attempts"]),
                      str(b["tokens"]), f"${b['cost_usd']:.4f}")
        out.print(t)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8787, show_default=True)
@click.pass_obj
def sim(obj: Ctx, host: str, port: int) -> None:
    """Serve the simulated provider (OpenAI- and Anthropic-compatible) over HTTP.

    Its behaviour comes from the config's [simulator] section; point a provider's
    base_url at http://HOST:PORT/v1 to use it from workers.
    """
    from batchroute.sim import SimConfig, serve_forever

    console.print(f"simulated provider on http://{host}:{port}/v1 (Ctrl-C to stop)")
    try:
        serve_forever(SimConfig.from_dict(obj.config.simulator), host, port)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
