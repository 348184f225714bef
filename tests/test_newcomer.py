"""A newcomer's path without a stumble (issue #17).

One-line errors for configuration and connection problems; batch states that end;
stalled jobs in `status`; `resume --budget-usd`; logs never on a command's stdout and
bad lines said once; warnings and `--fail-on-failed` when jobs failed; a submit that
stored nothing says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from batchroute import Client
from batchroute.batch_status import effective_state
from batchroute.cli import main
from batchroute.cli_errors import explain
from batchroute.cli_outcome import FAILED_EXIT, report_warnings, savings_warning
from batchroute.store import Store

from .conftest import ROOT, wait_for

NATURAL = ROOT / "jobs" / "examples" / "natural_batch.jsonl"


def _line(custom_id: str, content: str = "Is this spam? Answer yes or no. WIN", **body: object,
          ) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "gpt-4o", "max_tokens": 3, "messages": [
                           {"role": "user", "content": content}], **body}})


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
         ) -> subprocess.CompletedProcess[str]:
    """The real command line in a subprocess (what a user's shell runs)."""
    return subprocess.run([sys.executable, "-m", "batchroute.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def _one_line_error(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("Error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# --- 2. one-line errors ----------------------------------------------------------------

@pytest.mark.parametrize(("url", "says"), [
    ("postgresql://postgres:secret@127.0.0.1:1/x", "Connection refused"),
    ("postgresql://postgres@127.0.0.1:5432/batchroute_no_such_db", "does not exist"),
    ("sqlite:////no/such/dir/x.db", "unable to open database file"),
    ("not-a-url", "is not a database URL"),
])
def test_database_problems_are_one_line(url: str, says: str) -> None:
    if url.startswith("postgresql://postgres@127.0.0.1:5432"):
        pytest.importorskip("psycopg2")
    res = CliRunner().invoke(main, ["status", "b123"], env={"BATCHROUTE_DATABASE_URL": url})
    assert res.exit_code == 1
    line = res.stderr.strip()
    assert line.startswith("Error: ") and "\n" not in line, res.stderr
    assert says in line and "BATCHROUTE_DATABASE_URL" in line
    assert "secret" not in line  # the password is not printed


def test_debug_shows_the_traceback() -> None:
    env = {"BATCHROUTE_DATABASE_URL": "sqlite:////no/such/dir/x.db"}
    res = CliRunner().invoke(main, ["--debug", "status", "b1"], env=env)
    assert res.exit_code == 1 and res.exception is not None
    assert "OperationalError" in type(res.exception).__name__
    res = CliRunner().invoke(main, ["status", "b1"], env={**env, "BATCHROUTE_DEBUG": "1"})
    assert "OperationalError" in type(res.exception).__name__


def test_missing_postgres_driver_says_what_to_install(tmp_path: Path) -> None:
    fake = tmp_path / "nodriver"
    for name in ("psycopg", "psycopg2"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError({'No module named ' + name!r}, name={name!r})\n")
    proc = subprocess.run(
        [sys.executable, "-m", "batchroute.cli", "status", "b1"], capture_output=True,
        text=True, timeout=60, env={**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{ROOT}",
                                    "BATCHROUTE_DATABASE_URL": "postgresql://u@127.0.0.1/db"})
    assert "pip install 'batchroute[postgres]'" in _one_line_error(proc)


def _one_line(args: list[str], code: int = 1, **env: str) -> str:
    """The command's error, in process (faster than a subprocess under load): exits with
    `code`, raised nothing but SystemExit, said one `Error:` line."""
    res = CliRunner().invoke(main, args, env=env)
    assert res.exit_code == code and isinstance(res.exception, SystemExit), res.output
    lines = [x for x in res.stderr.splitlines() if x.startswith("Error: ")]
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_unreachable_broker_bad_toml_and_missing_file_are_one_line(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(_line("a") + "\n")
    assert "cannot reach the broker" in _one_line(
        ["submit", str(src)], BATCHROUTE_BROKER_URL="redis://127.0.0.1:1/0")
    bad = tmp_path / "bad.toml"
    bad.write_text("[providers\n")
    assert "invalid TOML" in _one_line(["--config", str(bad), "estimate", str(src)])
    assert "does not exist" in _one_line(["run", str(tmp_path / "no.jsonl"), "-o",
                                          str(tmp_path / "o.jsonl")], code=2)


def test_explain_knows_only_configuration_and_connection_problems() -> None:
    assert explain(ValueError("a bug")) is None
    assert explain(KeyError("x")) is None
    assert "pip install 'batchroute[postgres]'" in (
        explain(ModuleNotFoundError("no", name="psycopg2")) or "")
    assert explain(ModuleNotFoundError("no", name="numpy")) is None
    assert "is Redis running" in (explain(redis.ConnectionError("refused")) or "")
    assert "no such file" in (explain(FileNotFoundError(2, "x", "a.jsonl")) or "")


# --- 3. batch states and stalled jobs --------------------------------------------------

def test_effective_state_ends() -> None:
    assert effective_state("running", "f.jsonl", {"succeeded": 3, "failed": 1}) == "done"
    assert effective_state("running", "f.jsonl", {"succeeded": 3, "queued": 1}) == "running"
    assert effective_state("done", "f.jsonl", {"succeeded": 3, "queued": 1}) == "running"
    assert effective_state("ingesting", "Client.enqueue", {"succeeded": 2}) == "done"
    assert effective_state("ingesting", "Client.enqueue", {"running": 2}) == "running"
    assert effective_state("ingesting", "f.jsonl", {"queued": 2}) == "ingesting"
    assert effective_state("cancelled", "f.jsonl", {"cancelled": 2, "succeeded": 1}) == "cancelled"


def _status(*args: str, **env: str) -> dict:
    res = CliRunner().invoke(main, ["status", *args, "--json"], env=env)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.integration
def test_distributed_and_client_batches_become_done(start_worker) -> None:
    start_worker(concurrency=8)
    res = CliRunner().invoke(main, ["submit", str(NATURAL), "--json"])
    batch_id = json.loads(res.stdout)["batch_id"]
    store = Store()
    wait_for(lambda: _status(batch_id)["state"] == "done", 120, "the batch to be done")
    data = _status(batch_id)
    assert data["done"] == data["jobs"] == 20 and data["stalled"]["count"] == 0
    handle = Client.from_env("app-h17").enqueue(
        messages=[{"role": "user", "content": "Is this spam? Answer yes or no. WIN NOW"}],
        task="classify", max_tokens=3)
    handle.wait(timeout=60)
    assert _status("app-h17")["state"] == "done"
    assert store.find_batch("app-h17") is not None


def test_status_shows_stalled_jobs_and_what_to_run(redis_url: str) -> None:
    runner = CliRunner()
    batch_id = json.loads(runner.invoke(main, ["submit", str(NATURAL), "--json"]).stdout)[
        "batch_id"]
    assert _status(batch_id, BATCHROUTE_STALL_S="0")["stalled"]["count"] == 0  # on the broker
    redis.Redis.from_url(redis_url).flushdb()  # the broker forgot every message
    stalled = _status(batch_id, BATCHROUTE_STALL_S="0")["stalled"]
    assert stalled["count"] == stalled["queued_lost"] == 20
    assert f"batchroute resume {batch_id}" in stalled["advice"]
    assert _status(batch_id)["stalled"]["count"] == 0  # within the default 120 s: not yet
    res = runner.invoke(main, ["status", batch_id], env={"BATCHROUTE_STALL_S": "0"})
    assert "stalled" in res.stdout and f"batchroute resume {batch_id}" in res.stderr
    res = runner.invoke(main, ["resume", batch_id])
    assert res.exit_code == 0, res.output
    assert _status(batch_id, BATCHROUTE_STALL_S="0")["stalled"]["count"] == 0


# --- 4. resume --budget-usd ------------------------------------------------------------

def test_resume_budget_usd_reopens_the_budget_stops(redis_url: str, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["run", str(NATURAL), "-o", str(tmp_path / "o.jsonl"),
                               "--budget-usd", "0.00005"])
    assert res.exit_code == 0, res.output
    store = Store()
    batch = store.find_batch("natural_batch.jsonl")
    assert batch is not None
    stopped = [j for j in store.iter_jobs(batch.id)
               if (j.error or {}).get("code") == "budget_exhausted"]
    assert stopped
    res = runner.invoke(main, ["resume", batch.id, "--budget-usd", "5"])
    assert res.exit_code == 0, res.output
    assert (f"{len(stopped)} job(s) cancelled by the budget reopened with budget $5"
            in " ".join(res.stderr.split()))
    assert "0 cancelled job(s)" not in res.stderr
    assert store.find_batch(batch.id).budget_usd == 5  # type: ignore[union-attr]
    assert store.state_counts(batch.id).get("queued") == len(stopped)
    res = runner.invoke(main, ["submit", "--help"])
    assert "resume BATCH --budget-usd" in " ".join(res.stdout.split())


# --- 5 and 6. logs, warnings, exit codes -----------------------------------------------

def test_stdout_is_the_output_only_and_bad_lines_are_said_once(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(_line("ok-1") + "\nnot json\n" + _line("n-1", n=500) + "\n")
    env = {"BATCHROUTE_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    proc = _cli("run", str(src), "-o", str(tmp_path / "o.jsonl"), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # nothing else on stdout
    assert report["failed"] == 1
    assert proc.stderr.count("invalid JSON") == 1, proc.stderr
    assert '"event"' not in proc.stderr
    assert "warning: 1 of 2 job(s) failed" in proc.stderr
    assert "answers are simulated" in proc.stderr

    runner = CliRunner(env=env)
    res = runner.invoke(main, ["run", str(src), "-o", str(tmp_path / "o.jsonl"),
                               "--fail-on-failed"])
    assert res.exit_code == FAILED_EXIT, res.output
    assert "warning: 1 of 2 job(s) failed" in res.stderr
    batch = json.loads(runner.invoke(main, ["status", "in.jsonl", "--json"]).stdout)["batch_id"]
    assert runner.invoke(main, ["status", batch, "--fail-on-failed"]).exit_code == FAILED_EXIT
    out = str(tmp_path / "r.jsonl")
    assert runner.invoke(main, ["results", batch, "-o", out, "--fail-on-failed"]
                         ).exit_code == FAILED_EXIT
    res = runner.invoke(main, ["results", batch, "-o", out])
    assert res.exit_code == 0 and "warning: 1 of 2 job(s) failed" in res.stderr


def test_negative_savings_get_a_clear_warning() -> None:
    report = {"batch_id": "b1", "jobs": 20, "failed": 0, "cost_usd": 0.86,
              "baseline_cost_usd": 0.10, "savings_pct": -762.1}
    warning = savings_warning(report)
    assert warning and "more than the baseline" in warning and "8.6x" in warning
    assert savings_warning(report | {"cost_usd": 0.05}) is None
    assert report_warnings(report | {"failed": 12})[0].startswith("warning: 12 of 20")


# --- 1. a submit that stores nothing says why ------------------------------------------

def test_submit_into_a_database_that_has_the_batch_says_so(redis_url: str,
                                                          tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["run", str(NATURAL), "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["submit", str(NATURAL)])
    assert res.exit_code == 0, res.output
    said = " ".join(res.stderr.split())
    assert "0 enqueued: batch" in said and "already exists" in said
    assert "nothing was stored" in said and "new database" in said
    assert "20 jobs stored" not in said
