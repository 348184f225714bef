"""The distributed path on real parts: Redis broker, a real Celery worker process, SQLite
store shared through a file, the simulator over HTTP inside the worker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchroute import Client, JobFailed
from batchroute.cli import main
from batchroute.config import load_config
from batchroute.embedded import run_file
from batchroute.reports import batch_report
from batchroute.store import FINISHED, Store, get_engine

from .conftest import EXAMPLE, wait_for

pytestmark = pytest.mark.integration


def _done(store: Store, batch_id: str, total: int) -> bool:
    counts = store.state_counts(batch_id)
    return sum(counts.get(s, 0) for s in FINISHED) >= total


def test_batch_through_celery_matches_the_embedded_run(start_worker, tmp_path: Path) -> None:
    worker = start_worker(concurrency=16)
    runner = CliRunner()
    res = runner.invoke(main, ["submit", str(EXAMPLE), "--json"])
    assert res.exit_code == 0, res.output
    submitted = json.loads(res.stdout)
    batch_id, jobs = submitted["batch_id"], submitted["jobs"]
    assert jobs >= 200 and submitted["enqueued"] == jobs

    store = Store()
    wait_for(lambda: _done(store, batch_id, jobs), 180,
             f"batch {batch_id} to finish; worker log:\n{worker.log()[-3000:]}")

    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    res = runner.invoke(main, ["results", batch_id, "-o", str(out), "--errors", str(err)])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for p in (out, err) for x in p.read_text().splitlines()]
    assert len(lines) == jobs
    assert len({x["custom_id"] for x in lines}) == jobs

    res = runner.invoke(main, ["report", batch_id, "--json"])
    report = json.loads(res.stdout)
    attempts = store.attempts(batch_id)
    assert report["cost_usd"] == pytest.approx(sum(a.cost_usd for a in attempts), abs=1e-9)
    assert report["attempts"] == len(attempts) > jobs  # some jobs escalated
    assert report["savings_pct"] > 0

    # Determinism: the embedded run on its own database ends every job on the same model.
    local = Store(get_engine(f"sqlite:///{tmp_path / 'local.db'}"))
    run_file(EXAMPLE, tmp_path / "local.jsonl", None, load_config(), store=local)
    celery_models = {j.custom_id: (j.state, j.model) for j in store.iter_jobs(batch_id)}
    local_models = {j.custom_id: (j.state, j.model) for j in local.iter_jobs(batch_id)}
    assert celery_models == local_models
    assert batch_report(local, load_config(), batch_id)["cost_usd"] == pytest.approx(
        report["cost_usd"], rel=1e-9)


def test_resubmitting_adds_nothing(redis_url: str) -> None:
    runner = CliRunner()
    first = json.loads(runner.invoke(main, ["submit", str(EXAMPLE), "--json"]).stdout)
    second = json.loads(runner.invoke(main, ["submit", str(EXAMPLE), "--json"]).stdout)
    assert first["batch_id"] == second["batch_id"]
    assert Store().state_counts(first["batch_id"]) == {"queued": first["jobs"]}


def test_client_enqueue_wait_against_a_running_worker(start_worker) -> None:
    start_worker(concurrency=4)
    client = Client.from_env()
    handle = client.enqueue(
        messages=[{"role": "user", "content": "Is this spam? 'WIN A FREE CRUISE NOW'\n"
                                              "Answer with one of: yes, no."}],
        task="classify", validators=[{"type": "choices", "choices": ["yes", "no"]}],
        max_tokens=5)
    result = handle.wait(timeout=60)
    assert result.content.strip().rstrip(".").lower() in ("yes", "no")
    assert result.tier in (1, 2, 3)
    assert result.model.startswith("sim-")
    assert result.cost_usd > 0
    assert result.attempts >= 1


def test_client_wait_raises_a_clear_error_for_a_failed_job(start_worker) -> None:
    start_worker(concurrency=4)
    client = Client.from_env()
    # A regex nothing can match fails on every tier: the job ends failed, with the reason.
    handle = client.enqueue(messages=[{"role": "user", "content": "Say hello."}],
                            validators=[{"type": "regex", "pattern": "^ZZZ-NEVER$"}])
    with pytest.raises(JobFailed) as e:
        handle.wait(timeout=60)
    assert e.value.code == "validation_failed"
    assert "regex" in e.value.message


def test_async_client(start_worker) -> None:
    import asyncio

    from batchroute import AsyncClient

    start_worker(concurrency=4)

    async def go() -> str:
        client = AsyncClient.from_env()
        result = await client.run([{"role": "user", "content": "Write a Python function "
                                    "called `add_two` that adds two numbers."}],
                                  task="code", timeout=60)
        return result.content

    assert "def " in asyncio.run(go())


def test_worker_refuses_to_start_without_its_api_key(redis_url: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "keyed.toml"
    cfg.write_text('[providers.p]\nbase_url = "http://127.0.0.1:9/v1"\napi_key_env = '
                   '"BR_TEST_MISSING_KEY"\n[models.m]\nprovider = "p"\ntier = 1\n'
                   'price = { input_per_mtok = 1, output_per_mtok = 1 }\n')
    env = {k: v for k, v in os.environ.items() if k != "BR_TEST_MISSING_KEY"}
    env["BATCHROUTE_CONFIG"] = str(cfg)
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "workers", "inspect", "ping"],
                          env=env, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode != 0
    assert "BR_TEST_MISSING_KEY" in proc.stderr + proc.stdout
