"""Each provider error class and its policy, over real HTTP to the simulator.

The harness runs jobs through the real pipeline with the in-process dispatcher
(the same code the Celery worker runs), against a SimServer whose faults we
switch per model.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from batchroute.breaker import BreakerConfig, MemoryBreakers
from batchroute.client import Client, JobFailed
from batchroute.config import Config, parse_config
from batchroute.dispatch import LocalDispatcher
from batchroute.pipeline import process_job
from batchroute.policy import MAX_ATTEMPTS_PER_JOB
from batchroute.providers import ErrorKind, ProviderError, call
from batchroute.runtime import Runtime
from batchroute.sim import SimConfig, SimModel, SimServer
from batchroute.store import Store

PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}


@pytest.fixture
def sim() -> Iterator[SimServer]:
    with SimServer(SimConfig(models={}, default=SimModel(), seed=1)) as server:
        yield server


def make_config(sim: SimServer, timeout_s: float = 5.0, **breaker: float) -> Config:
    return parse_config({
        "providers": {
            "a": {"base_url": f"{sim.url}/v1", "timeout_s": timeout_s, "max_retries": 1},
            "b": {"base_url": f"{sim.url}/v1", "timeout_s": timeout_s, "max_retries": 1},
            "anth": {"kind": "anthropic", "base_url": f"{sim.url}/v1", "timeout_s": timeout_s},
        },
        "models": {
            "a-small": {"provider": "a", "tier": 1, "price": PRICE},
            "b-small": {"provider": "b", "tier": 1, "price": PRICE},
            "a-large": {"provider": "a", "tier": 2, "price": PRICE},
            "claude-x": {"provider": "anth", "tier": 3, "price": PRICE},
        },
        "tasks": {"default": {"ladder": [1, 2], "validators": [{"type": "non_empty"},
                                                               {"type": "finish_reason"}]}},
        "breaker": {"failures": 3, "window_s": 30, "cooldown_s": 1.0, **breaker},
    })


class Harness:
    """Runtime + in-process dispatcher + Client: enqueue jobs, run them, inspect the store."""

    def __init__(self, config: Config) -> None:
        self.store = Store()
        self.dispatcher = LocalDispatcher(concurrency=8)
        self.rt = Runtime(config, self.store, self.dispatcher,
                          breakers=MemoryBreakers(config.breaker))
        self.dispatcher.handler = lambda j, n: process_job(self.rt, j, n)
        self.client = Client(config, self.store, self.dispatcher, batch="t")

    def run(self, n: int = 1, timeout: float = 60, **kw: Any) -> list[str]:
        ids = [self.client.enqueue(messages=[{"role": "user", "content": f"Say hi #{i}."}],
                                   **kw).job_id for i in range(n)]
        assert self.dispatcher.join(timeout), "jobs did not finish"
        assert not self.dispatcher.errors, self.dispatcher.errors
        return ids

    def close(self) -> None:
        self.dispatcher.close()
        self.rt.close()


@pytest.fixture
def harness(sim: SimServer) -> Iterator[Harness]:
    h = Harness(make_config(sim))
    yield h
    h.close()


def provider_call(sim: SimServer, model: str, provider: str = "a", timeout_s: float = 5.0,
                  **body: Any) -> Any:
    config = make_config(sim, timeout_s=timeout_s)
    p = config.providers[provider]
    with httpx.Client() as client:
        return call(client, p, p.base_url, model,
                    {"messages": [{"role": "user", "content": "Say hi."}], **body})


# ---- the adapters map every failure into the taxonomy -----------------------------------
@pytest.mark.parametrize(("status", "kind"), [
    (429, ErrorKind.RATE_LIMITED), (500, ErrorKind.OVERLOADED), (503, ErrorKind.OVERLOADED),
    (529, ErrorKind.OVERLOADED)])
def test_http_errors_map_to_kinds(sim: SimServer, status: int, kind: ErrorKind) -> None:
    sim.set_model("m", SimModel(error_rates={status: 1.0}, retry_after_s=2.5))
    with pytest.raises(ProviderError) as e:
        provider_call(sim, "m")
    assert e.value.kind is kind
    assert e.value.status == status
    if status == 429:
        assert e.value.retry_after == pytest.approx(2.5)


def test_timeout_connection_malformed_context_auth(sim: SimServer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    sim.set_model("slow", SimModel(timeout_rate=1.0, hang_s=3))
    with pytest.raises(ProviderError) as e:
        provider_call(sim, "slow", timeout_s=0.3)
    assert e.value.kind is ErrorKind.TIMEOUT

    sim.set_model("junk", SimModel(malformed_rate=1.0))
    with pytest.raises(ProviderError) as e:
        provider_call(sim, "junk")
    assert e.value.kind is ErrorKind.MALFORMED_REPLY

    sim.set_model("tiny", SimModel(context_window=5))
    with pytest.raises(ProviderError) as e:
        provider_call(sim, "tiny")
    assert e.value.kind is ErrorKind.CONTEXT_LENGTH

    config = parse_config({"providers": {"x": {"base_url": "http://127.0.0.1:9/v1",
                                               "api_key_env": "BR_TEST_KEY"}},
                           "models": {"m": {"provider": "x", "tier": 1, "price": PRICE}}})
    monkeypatch.setenv("BR_TEST_KEY", "invalid")
    with httpx.Client() as client, pytest.raises(ProviderError) as e:
        call(client, config.providers["x"], "http://127.0.0.1:9/v1", "m",
             {"messages": [{"role": "user", "content": "x"}]})
    assert e.value.kind is ErrorKind.CONNECTION
    with httpx.Client() as client, pytest.raises(ProviderError) as e:
        call(client, config.providers["x"], f"{sim.url}/v1", "m",
             {"messages": [{"role": "user", "content": "x"}]})
    assert e.value.kind is ErrorKind.AUTH


def test_anthropic_adapter_translates_both_ways(sim: SimServer) -> None:
    c = provider_call(sim, "claude-x", provider="anth", max_tokens=50,
                      messages=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Say hi."}])
    assert c.content
    assert c.finish_reason == "stop"
    assert c.usage.prompt_tokens > 0 and c.usage.completion_tokens > 0
    assert c.body["object"] == "chat.completion"
    assert c.body["choices"][0]["message"]["content"] == c.content
    sim.set_model("claude-y", SimModel(error_rates={529: 1.0}))
    with pytest.raises(ProviderError) as e:
        provider_call(sim, "claude-y", provider="anth")
    assert e.value.kind is ErrorKind.OVERLOADED


# ---- the policies, through the real pipeline --------------------------------------------
def test_retry_after_is_waited_for(sim: SimServer, harness: Harness) -> None:
    sim.set_model("a-small", SimModel(error_rates={429: 1.0}, retry_after_s=1.0))
    # Heal the model once the first 429 has been served.
    def heal() -> None:
        deadline = time.monotonic() + 10
        while sim.stats()["by_status"].get("429", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        sim.set_model("a-small", SimModel())
    t = threading.Thread(target=heal)
    t.start()
    (job_id,) = harness.run()
    t.join()
    attempts = harness.store.job_attempts(job_id)
    assert [a.error_kind for a in attempts] == ["rate_limited", None]
    assert attempts[1].model == "a-small"  # retried on the same model, not failed over
    gap = (attempts[1].created_at - attempts[0].created_at).total_seconds()
    assert gap >= 1.0 - 0.05  # Retry-After: 1 s (minus the first call's own latency)


def test_outage_shifts_jobs_to_the_equivalent_provider(sim: SimServer, harness: Harness) -> None:
    sim.set_model("a-small", SimModel(error_rates={503: 1.0}))
    ids = harness.run(n=30)
    jobs = [harness.store.get_job(i) for i in ids]
    assert all(j is not None and j.state == "succeeded" for j in jobs)
    assert {j.model for j in jobs if j is not None} <= {"b-small", "a-large"}
    calls_to_a = sim.stats()["by_model"].get("a-small", 0)
    # The breaker opened after 3 failures: a-small is not called once per job.
    assert calls_to_a < 15, calls_to_a
    assert harness.rt.breakers.snapshot()["a-small"]["state"] in ("open", "half_open")
    assert harness.rt.breakers.snapshot()["a-small"]["opened"] >= 1
    # The ledger stays exact across retries, failovers and escalations: to the cent.
    from batchroute.reports import batch_report

    report = batch_report(harness.store, harness.rt.config, "t")
    attempts = harness.store.attempts("t")
    assert report["resilience"]["failovers"] >= 1
    assert round(report["cost_usd"], 2) == round(sum(a.cost_usd for a in attempts), 2)
    assert report["cost_usd"] == pytest.approx(sum(a.cost_usd for a in attempts), abs=1e-9)
    assert sum(b["cost_usd"] for b in report["by_model"].values()) == pytest.approx(
        report["cost_usd"], abs=1e-9)


def test_breaker_probes_and_closes_after_the_cooldown(sim: SimServer, harness: Harness) -> None:
    sim.set_model("a-small", SimModel(error_rates={503: 1.0}))
    harness.run(n=10)
    assert harness.rt.breakers.snapshot()["a-small"]["state"] != "closed"
    sim.set_model("a-small", SimModel())
    time.sleep(1.1)  # cooldown_s = 1
    (job_id,) = harness.run()
    job = harness.store.get_job(job_id)
    assert job is not None and job.model == "a-small" and job.state == "succeeded"
    assert harness.rt.breakers.snapshot()["a-small"]["state"] == "closed"


def test_whole_tier_down_waits_then_moves_up(sim: SimServer) -> None:
    config = make_config(sim, cooldown_s=0.05)
    sim.set_model("a-small", SimModel(error_rates={500: 1.0}))
    sim.set_model("b-small", SimModel(error_rates={500: 1.0}))
    h = Harness(config)
    try:
        ids = h.run(n=5)
        jobs = [h.store.get_job(i) for i in ids]
        assert all(j is not None and j.state == "succeeded" and j.tier == 2 for j in jobs)
        for i in ids:  # bounded: nobody retried forever (breaker probes add a few calls)
            assert len(h.store.job_attempts(i)) <= MAX_ATTEMPTS_PER_JOB
    finally:
        h.close()


def test_fatal_errors_fail_at_once_with_the_reason(sim: SimServer, harness: Harness,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    sim.set_model("a-small", SimModel(context_window=5))
    sim.set_model("b-small", SimModel(context_window=5))
    sim.set_model("a-large", SimModel(context_window=5))
    (job_id,) = harness.run()
    job = harness.store.get_job(job_id)
    assert job is not None and job.state == "failed"
    assert job.error is not None and job.error["code"] == "context_length_exceeded"
    with pytest.raises(JobFailed, match="context_length_exceeded"):
        harness.client.enqueue(messages=[{"role": "user", "content": "x"}]).wait(10)


def test_bad_output_classes_escalate(sim: SimServer, harness: Harness) -> None:
    for fault in ("empty_rate", "length_rate", "content_filter_rate"):
        rates: dict[str, Any] = {fault: 1.0}
        sim.set_model("a-small", SimModel(**rates))
        sim.set_model("b-small", SimModel(**rates))
        (job_id,) = harness.run()
        job = harness.store.get_job(job_id)
        assert job is not None and job.state == "succeeded" and job.tier == 2, fault
        assert job.escalations and job.escalations[0]["from_tier"] == 1


def test_unreadable_replies_are_retried_and_bounded(sim: SimServer, harness: Harness) -> None:
    for m in ("a-small", "b-small", "a-large"):
        sim.set_model(m, SimModel(malformed_rate=1.0))
    (job_id,) = harness.run()
    job = harness.store.get_job(job_id)
    assert job is not None and job.state == "failed"
    assert job.error is not None and job.error["code"] in ("provider_error", "no_model_available")
    assert len(harness.store.job_attempts(job_id)) <= 12


def test_secrets_never_reach_logs_store_results_or_broker(
        sim: SimServer, start_worker: Any, tmp_path: Any, redis_url: str) -> None:
    """A canary key, used for real calls by a real worker, appears in nothing it wrote."""
    import json
    import subprocess
    import sys

    import redis

    canary = "sk-canary-7f3a9c1e5d"
    cfg = tmp_path / "canary.toml"
    cfg.write_text(
        f'[providers.p]\nbase_url = "{sim.url}/v1"\napi_key_env = "BR_CANARY_KEY"\n'
        '[models.m]\nprovider = "p"\ntier = 1\nprice = { input_per_mtok = 1, '
        'output_per_mtok = 1 }\n')
    env = {"BATCHROUTE_CONFIG": str(cfg), "BR_CANARY_KEY": canary,
           "BATCHROUTE_LOG_LEVEL": "DEBUG"}
    worker = start_worker(concurrency=4, **env)
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"custom_id": f"c{i}", "body": {"messages": [
        {"role": "user", "content": f"hello {i}"}]}}) for i in range(20)) + "\n")
    run_env = {**os.environ, **env}
    subprocess.run([sys.executable, "-m", "batchroute.cli", "submit", str(src)], env=run_env,
                   check=True, capture_output=True, timeout=60)
    store = Store()
    batch_id = _only_batch(store)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        counts = store.state_counts(batch_id)
        if counts.get("succeeded", 0) + counts.get("failed", 0) == 20:
            break
        time.sleep(0.2)
    out = tmp_path / "out.jsonl"
    subprocess.run([sys.executable, "-m", "batchroute.cli", "results", batch_id,
                    "-o", str(out)], env=run_env, check=True, capture_output=True, timeout=60)
    worker.stop()
    assert sim.stats()["requests"] >= 20  # the key was really used
    db_path = os.environ["BATCHROUTE_DATABASE_URL"].removeprefix("sqlite:///")
    r = redis.Redis.from_url(redis_url)
    broker_dump = b"".join(k + repr(r.dump(k)).encode() for k in cast(list[bytes], r.keys("*")))
    from sqlmodel import SQLModel

    rows = b""
    with store.engine.connect() as conn:  # every row of every table, whichever the store
        for table in SQLModel.metadata.sorted_tables:
            rows += repr(conn.execute(table.select()).all()).encode()
    assert b"c19" in rows  # the dump really holds the jobs
    for name, blob in [("worker log", worker.log().encode()), ("results", out.read_bytes()),
                       ("database rows", rows),
                       ("database", b"".join(Path(p).read_bytes() for p in
                                             (db_path, db_path + "-wal")
                                             if os.path.exists(p))),
                       ("broker", broker_dump)]:
        assert canary.encode() not in blob, f"API key leaked into the {name}"


def _only_batch(store: Store) -> str:
    from sqlmodel import select

    from batchroute.store import Batch
    with store.session() as s:
        return s.exec(select(Batch.id)).one()


def test_breaker_config_parses() -> None:
    assert BreakerConfig.from_dict({"failures": "4", "cooldown_s": 2}).failures == 4


def test_bad_key_fails_the_job_at_once(sim: SimServer, monkeypatch: pytest.MonkeyPatch) -> None:
    data = {"providers": {"p": {"base_url": f"{sim.url}/v1", "api_key_env": "BR_TEST_KEY2"}},
            "models": {"m1": {"provider": "p", "tier": 1, "price": PRICE},
                       "m2": {"provider": "p", "tier": 2, "price": PRICE}}}
    monkeypatch.setenv("BR_TEST_KEY2", "invalid")
    h = Harness(parse_config(data))
    try:
        (job_id,) = h.run()
        job = h.store.get_job(job_id)
        assert job is not None and job.state == "failed"
        assert job.error is not None and job.error["code"] == "auth"
        assert len(h.store.job_attempts(job_id)) == 1  # no other model fixes a bad key
    finally:
        h.close()


@pytest.mark.parametrize(("headers", "seconds"), [
    ({"retry-after-ms": "250"}, 0.25),
    ({"retry-after": "3"}, 3.0),
    ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),
    ({"x-ratelimit-reset-tokens": "20ms"}, 0.02),
    ({}, None),
])
def test_retry_after_headers(headers: dict[str, str], seconds: float | None) -> None:
    from batchroute.providers.base import parse_retry_after

    got = parse_retry_after(httpx.Headers(headers))
    assert got == (pytest.approx(seconds) if seconds is not None else None)
