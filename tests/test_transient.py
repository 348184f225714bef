"""Transient provider errors never fail or stall a batch (issue #14).

One provider, one model (no failover, no higher tier), 10% 429 + 10% 503 from the
simulator: every job completes, embedded and through a real Celery worker. And a model
that is really down fails its jobs only at the batch deadline, without spinning.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchroute.cli import main
from batchroute.config import load_config
from batchroute.embedded import run_file
from batchroute.sim import SimConfig, SimModel, SimServer
from batchroute.store import Store

from .conftest import wait_for

FAULTY = SimModel(error_rates={429: 0.1, 503: 0.1}, retry_after_s=0.2)


@pytest.fixture
def sim() -> Iterator[SimServer]:
    with SimServer(SimConfig(models={"only": FAULTY}, default=FAULTY, seed=7)) as server:
        yield server


def _config(tmp_path: Path, sim: SimServer) -> Path:
    cfg = tmp_path / "only.toml"
    cfg.write_text(
        f'[providers.p]\nbase_url = "{sim.url}/v1"\ntimeout_s = 5\n'
        '[models.only]\nprovider = "p"\ntier = 1\n'
        'price = { input_per_mtok = 1, output_per_mtok = 2 }\n'
        '[tasks.default]\nladder = [1]\n')
    return cfg


def _jobs(tmp_path: Path, n: int) -> Path:
    path = tmp_path / f"jobs{n}.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"c{i}", "body": {
        "messages": [{"role": "user", "content": f"Say hi #{i}."}], "max_tokens": 8}}) + "\n"
        for i in range(n)))
    return path


@pytest.mark.integration
def test_only_model_with_429s_and_503s_completes_every_job_embedded(
        sim: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHROUTE_CONFIG", str(_config(tmp_path, sim)))
    started = time.monotonic()
    outcome = run_file(_jobs(tmp_path, 300), tmp_path / "out.jsonl", tmp_path / "err.jsonl",
                       load_config(), concurrency=32)
    elapsed = time.monotonic() - started
    assert outcome.report["succeeded"] == 300, outcome.report
    stats = sim.stats()
    assert stats["by_status"].get("429", 0) > 10 and stats["by_status"].get("503", 0) > 10
    assert outcome.breakers["only"]["opened"] == 0  # 10% failures is not an outage
    assert elapsed < 30, elapsed


@pytest.mark.integration
def test_only_model_with_429s_and_503s_completes_every_job_on_a_celery_worker(
        sim: SimServer, tmp_path: Path, start_worker, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, sim)
    monkeypatch.setenv("BATCHROUTE_CONFIG", str(cfg))
    start_worker(concurrency=16, BATCHROUTE_CONFIG=str(cfg))
    res = CliRunner().invoke(main, ["submit", str(_jobs(tmp_path, 200)), "--json"])
    assert res.exit_code == 0, res.output
    batch_id = json.loads(res.stdout)["batch_id"]
    store = Store()

    def done() -> bool:
        counts = store.state_counts(batch_id)
        return counts.get("succeeded", 0) + counts.get("failed", 0) == 200

    wait_for(done, 90, "the batch to finish")
    assert store.state_counts(batch_id).get("succeeded") == 200
    assert sim.stats()["by_status"].get("503", 0) > 5


@pytest.mark.integration
def test_a_model_down_fails_its_jobs_only_at_the_deadline_without_spinning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    down = SimModel(error_rates={503: 1.0})
    with SimServer(SimConfig(models={"only": down}, default=down, seed=1)) as sim:
        cfg = _config(tmp_path, sim)
        cfg.write_text(cfg.read_text() + "[breaker]\nmin_calls = 5\ncooldown_s = 0.5\n"
                                         "half_open_calls = 2\n")
        monkeypatch.setenv("BATCHROUTE_CONFIG", str(cfg))
        started = time.monotonic()
        res = CliRunner().invoke(main, ["run", str(_jobs(tmp_path, 40)), "-o",
                                        str(tmp_path / "out.jsonl"), "--deadline", "4s",
                                        "--json"])
        assert res.exit_code == 0, res.output
        elapsed = time.monotonic() - started
        report = json.loads(res.stdout[res.stdout.index("{"):])
        calls = sim.stats()["requests"]
    assert report["failed"] == 40
    codes = {json.loads(x)["error"]["code"]
             for x in (tmp_path / "out.jsonl").read_text().splitlines()}
    assert codes <= {"deadline_exceeded", "provider_error"}, codes
    # The breaker kept the dead model from being called once per job per retry: the open
    # breaker lets only trial calls through, growing further apart.
    assert calls < 40 * 3, calls
    assert elapsed >= 4 - 0.2  # nobody gave up before the deadline
