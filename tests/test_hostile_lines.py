"""Issue #15, "a job line can stop a worker or reach out of it": hostile lines on real
stores, a real Celery worker and a real HTTP server.

* every case of tests/badinput_lines.py (with tests/test_badinput.py, over 100 line
  cases) is that line's numbered error while its neighbours complete, on SQLite and on
  PostgreSQL, through `run` and through `submit`/`status`/`resume`;
* a pattern that backtracks catastrophically on Python's `re` leaves a Celery worker
  answering `celery inspect ping`, and its job ends within seconds;
* a schema `$ref` to a local HTTP server or to file:///etc/passwd is never fetched;
* `results -o a.jsonl --errors ./a.jsonl` keeps every error line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batchroute import Client, JobFailed
from batchroute.cli import main
from batchroute.config import load_config
from batchroute.embedded import run_file
from batchroute.ingest import file_batch_id
from batchroute.store import Store, get_engine
from batchroute.validators import ValidatorError, build_validators

from .badinput_lines import HOSTILE, body, line, nul, schema_check
from .conftest import ROOT, wait_for
from .recording_server import recording_server
from .test_badinput import CASES

CONFIG = load_config()


def good(i: int) -> bytes:
    return line(f"ok-{i}", body(f"Write one friendly sentence about case {i}."))


def corpus_file(path: Path) -> dict[str, int]:
    """good, bad, good, bad, ..., good: every bad line between two good ones."""
    lines = [good(0)]
    where: dict[str, int] = {}
    for i, (case, raw, _) in enumerate(HOSTILE, start=1):
        lines.append(raw)
        where[case] = len(lines)
        lines.append(good(i))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return where


def test_the_corpus_has_over_100_line_cases() -> None:
    ids = [c for c, _, _ in CASES] + [c for c, _, _ in HOSTILE]
    assert len(ids) == len(set(ids)) >= 100


@pytest.mark.integration
def test_every_hostile_line_is_its_own_error_and_the_rest_completes(
        db_url: str, tmp_path: Path) -> None:
    src = tmp_path / "hostile.jsonl"
    where = corpus_file(src)
    store = Store(get_engine(db_url))
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    outcome = run_file(src, out, err, CONFIG, store=store)
    errors = {e["error"]["line"]: e for x in err.read_text().splitlines()
              for e in [json.loads(x)]}
    results = {r["custom_id"]: r for x in out.read_text().splitlines()
               for r in [json.loads(x)]}
    wrong: list[str] = []
    for case, _, expected in HOSTILE:
        n = where[case]
        e = errors.get(n)
        if e is None:
            wrong.append(f"{case}: no error for line {n}")
            continue
        message = e["error"]["message"]
        if (e["error"]["code"] != "invalid_line" or not message.startswith(f"line {n}: ")
                or expected not in message or len(message) > 1100):
            wrong.append(f"{case}: {message[:300]!r} (wanted {expected!r})")
    assert not wrong, "\n".join(wrong)
    assert sorted(results) == sorted(f"ok-{i}" for i in range(len(HOSTILE) + 1))
    assert all(r["response"]["status_code"] == 200 for r in results.values())
    assert outcome.ingest.problem_count == len(HOSTILE) == len(errors)
    assert store.count_line_errors(outcome.ingest.batch_id) == len(HOSTILE)
    assert [e.line_no for e in store.iter_line_errors(outcome.ingest.batch_id, page=7)] \
        == sorted(where.values())


@pytest.mark.integration
def test_submit_status_and_resume_store_the_rest_around_nul_and_giant_custom_ids(
        db_url: str, redis_url: str, tmp_path: Path) -> None:
    """On PostgreSQL a NUL or a 100k-character custom_id used to abort submit (and resume
    the same way), losing the rest of the file, and status then said 0 bad lines."""
    bad = [nul(line("zNUL-HERE")), nul(line("n1", body("aNUL-HEREb"))), line("c" * 100_000),
           nul(line("m", batchroute={"metadata": {"kNUL-HERE": "v"}}))]
    lines = [good(0)]
    for i, raw in enumerate(bad, start=1):
        lines += [raw, good(i)]
    src = tmp_path / "nul.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    runner = CliRunner()
    res = runner.invoke(main, ["submit", str(src), "--json"])
    assert res.exit_code == 0, res.output
    submitted = json.loads(res.stdout)
    assert (submitted["jobs"], submitted["bad_lines"]) == (len(bad) + 1, len(bad))
    assert [p["line"] for p in submitted["problems"]] == [2, 4, 6, 8]
    batch_id = submitted["batch_id"]
    status = json.loads(runner.invoke(main, ["status", batch_id, "--json"]).stdout)
    assert status["bad_line_count"] == len(bad) and len(status["bad_lines"]) == len(bad)
    assert status["jobs"] == len(bad) + 1
    # A submit cut short leaves the batch "ingesting": resume re-reads the file.
    store = Store()
    store.update_batch(batch_id, state="ingesting")
    res = runner.invoke(main, ["resume", batch_id, "--json"])
    assert res.exit_code == 0, res.output
    assert store.count_line_errors(batch_id) == len(bad)
    assert sum(store.state_counts(batch_id).values()) == len(bad) + 1


@pytest.mark.integration
def test_a_backtracking_pattern_leaves_the_worker_answering_ping(start_worker,
                                                                  redis_url: str) -> None:
    """`(a+)+$` against 40 a's and a "!" takes Python's re about 2^40 steps, holding the
    GIL: the worker used to stop answering pings, and the job never ended. On RE2 the
    check is instant: the job ends (validation_failed, nothing matches) within seconds of
    reaching a ready worker, and `celery inspect ping` answers."""
    from celery import Celery

    worker = start_worker(concurrency=4)
    control = Celery(broker=redis_url).control
    wait_for(lambda: bool(control.ping(timeout=1.0)), 120,
             f"the worker to answer pings; log:\n{worker.log()[-2000:]}")
    run = "a" * 40 + "!"
    client = Client.from_env()
    started = time.monotonic()
    handle = client.enqueue(
        messages=[{"role": "user", "content": f"Answer with one of: {run}, no.\n"
                                              f"Expected: {run}"}],
        task="classify", validators=[{"type": "regex", "pattern": "(a+)+$"}], max_tokens=30)
    with pytest.raises(JobFailed) as failed:
        handle.wait(timeout=90)
    assert failed.value.code == "validation_failed", failed.value.message
    assert "no match for /(a+)+$/" in failed.value.message
    assert time.monotonic() - started < 30, worker.log()[-2000:]
    env = {**os.environ, "BATCHROUTE_BROKER_URL": redis_url, "PYTHONPATH": str(ROOT)}
    ping = subprocess.run([sys.executable, "-m", "celery", "-A", "workers", "inspect", "ping",
                           "--timeout", "10", "-d", worker.name], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=90)
    assert ping.returncode == 0 and "pong" in ping.stdout, (ping.stdout, ping.stderr)


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[str]]]:
    with recording_server(b'{"type": "string"}') as served:
        yield served


def test_schema_refs_to_http_and_file_are_never_fetched(recorder: tuple[str, list[str]],
                                                        tmp_path: Path) -> None:
    base, hits = recorder
    # The server works, and plain jsonschema would fetch from it (the hole being closed).
    import jsonschema

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jsonschema.Draft202012Validator({"$ref": f"{base}/plain.json"}).is_valid("x")
    assert hits == ["/plain.json"]
    hits.clear()

    schemas: list[dict[str, Any]] = [
        {"$ref": f"{base}/a.json"}, {"$ref": "file:///etc/passwd"},
        {"$id": f"{base}/", "$ref": "b.json"},
        {"properties": {"p": {"$ref": f"{base}/c.json#/x"}}}]
    for schema in schemas:  # refused when built, from a job line or a config
        with pytest.raises(ValidatorError, match="not a local reference"):
            build_validators([{"type": "json_schema", "schema": schema}])
    # Built past that check, the validator still resolves only within the schema.
    from batchroute.validators.checks import _JsonSchema
    from batchroute.validators.safety import schema_validator

    for schema in schemas:
        verdict = _JsonSchema("json_schema", schema).check(_completion('{"p": 1}'))
        assert not verdict.ok and "cannot be resolved" in verdict.reason
        with pytest.raises(Exception, match="Unresolvable|Unretrievable|resolv"):
            list(schema_validator(schema).iter_errors({"p": 1}))
    # And through a whole run: the lines are errors, the good line completes.
    src = tmp_path / "refs.jsonl"
    src.write_bytes(b"\n".join([schema_check(s, cid=f"r{i}") for i, s in enumerate(schemas)]
                               + [good(0)]) + b"\n")
    store = Store(get_engine(f"sqlite:///{tmp_path / 'refs.db'}"))
    outcome = run_file(src, tmp_path / "out.jsonl", None, CONFIG, store=store)
    assert outcome.ingest.problem_count == len(schemas) and outcome.report["succeeded"] == 1
    time.sleep(0.2)
    assert hits == []


def _completion(content: str) -> Any:
    from batchroute.completion import Completion, Usage

    return Completion(content=content, finish_reason="stop", usage=Usage(1, 1), model="m",
                      request_id="r")


@pytest.mark.parametrize("errors_arg", ["a.jsonl", "./a.jsonl", "ABS"])
def test_results_and_run_with_errors_naming_the_output_file_keep_both(
        tmp_path: Path, errors_arg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join([good(1), b"{broken", good(2), line("c" * 600)]) + b"\n")
    errors = str(tmp_path / "a.jsonl") if errors_arg == "ABS" else errors_arg
    runner = CliRunner()
    res = runner.invoke(main, ["run", str(src), "-o", "a.jsonl", "--errors", errors])
    assert res.exit_code == 0, res.output
    kinds = [json.loads(x)["error"] is None for x in Path("a.jsonl").read_text().splitlines()]
    assert sorted(kinds) == [False, False, True, True]
    batch_id = file_batch_id(src)
    Path("a.jsonl").unlink()
    res = runner.invoke(main, ["results", batch_id, "-o", "a.jsonl", "--errors", errors])
    assert res.exit_code == 0, res.output
    kinds = [json.loads(x)["error"] is None for x in Path("a.jsonl").read_text().splitlines()]
    assert sorted(kinds) == [False, False, True, True]


def test_run_prints_the_first_20_bad_lines_once_and_a_count(tmp_path: Path) -> None:
    """A file of bad lines used to print every one twice (a warning log line and the
    summary); now the summary shows 20 and counts the rest, and nothing else repeats."""
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\n".join([good(0)] + [b'{"custom_id": "t%d", "body": ' % i
                                             for i in range(2000)]) + b"\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BATCHROUTE_LOG_FORMAT": "console",
           "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "batchroute.cli", "run", str(src), "-o",
                          str(tmp_path / "o.jsonl")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    for n in (2, 21):
        assert text.count(f"line {n}: invalid JSON") == 1, text[-3000:]
    assert "line 22: invalid JSON" not in text and "line 2001" not in text
    assert "2000 line(s) rejected" in text and "... and 1980 more" in text
    assert len(text.splitlines()) < 100


def test_files_of_megabyte_lines_parse_in_process(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Forked parsers each held several near-cap lines and a copy of the CLI's heap."""
    from batchroute.chunkpool import default_workers
    from batchroute.ingest import ingest_workers

    monkeypatch.delenv("BATCHROUTE_INGEST_WORKERS", raising=False)
    huge, many = tmp_path / "huge.jsonl", tmp_path / "many.jsonl"
    huge.write_bytes(b"\n".join(line(f"h{i}", body("x " * 600_000)) for i in range(4)))
    many.write_bytes(b"\n".join(good(i) for i in range(60_000)))
    assert huge.stat().st_size > 4 * 2**20 and many.stat().st_size > 4 * 2**20
    assert ingest_workers(huge) == 0
    assert ingest_workers(many) == default_workers()


def test_a_stored_spec_that_no_longer_builds_fails_the_answer_instead_of_the_worker() -> None:
    """A job stored before RE2 with a backreference pattern: the worker judging its paid
    answer gets a failed verdict naming the reason (the job ends validation_failed),
    not a ValidatorError after every paid call."""
    from batchroute.validators import build_for_run, failure_reason, run_validators

    checks = build_for_run([{"type": "regex", "pattern": r"(a)\1"}])
    verdicts = run_validators(checks, _completion("aa"))
    assert [v.ok for v in verdicts] == [False]
    assert "validators cannot be built" in failure_reason(verdicts)
    assert "no backreferences" in failure_reason(verdicts)
    assert [v.ok for v in run_validators(build_for_run([{"type": "regex", "pattern": "a"}]),
                                         _completion("aa"))] == [True]


def test_estimate_reports_every_hostile_line_instead_of_aborting(tmp_path: Path) -> None:
    """A 100-level schema or tools array used to abort estimate with RecursionError."""
    src = tmp_path / "hostile.jsonl"
    corpus_file(src)
    res = CliRunner().invoke(main, ["estimate", str(src), "--json"])
    assert res.exit_code == 0, res.output[-2000:]
    data = json.loads(res.stdout)
    assert (data["jobs"], data["bad_lines"]) == (len(HOSTILE) + 1, len(HOSTILE))
