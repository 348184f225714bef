"""Nothing lost, on real parts: Celery workers SIGKILLed mid-batch, Redis restarted empty
mid-batch, cancel/resume through the broker, pickle refused, Flower behind basic auth, and
no secret in any artefact.

The simulator runs in the test process (over HTTP), so it outlives the workers that are
killed and counts every call that reached it: the ledger can then be checked against the
calls the "provider" really served.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner
from sqlmodel import SQLModel

from batchroute.cli import main
from batchroute.sim import SimConfig, SimServer
from batchroute.store import FINISHED, LOST, Store

from .conftest import EXAMPLE, ROOT, wait_for
from .dedicated_redis import DedicatedRedis, free_port, own_broker

__all__ = ["own_broker"]  # the fixture, imported for use here

pytestmark = pytest.mark.integration

SIM_LATENCY = {"latency_ms": 25, "latency_jitter_ms": 20}
# Seconds instead of minutes: a dead worker's claims lapse after 3 s, a queued job untouched
# for 3 s is checked against the broker. The hard limit must stay under the lease.
# No task events: nobody watches these workers, and they would cost throughput.
FAST_RECOVERY = {"BATCHROUTE_LEASE_S": "3", "BATCHROUTE_TASK_TIME_LIMIT_S": "2",
                 "BATCHROUTE_STALE_QUEUED_S": "3", "BATCHROUTE_SWEEP_INTERVAL_S": "1",
                 "BATCHROUTE_TASK_EVENTS": "0"}


def config_toml(base_url: str, api_key_env: str = "") -> str:
    """The default routing config on `base_url`, with simulator latency so kills land
    mid-call."""
    key = f'api_key_env = "{api_key_env}"\n' if api_key_env else ""
    latency = "".join(f"{k} = {v}\n" for k, v in SIM_LATENCY.items())
    parts = [f'[providers.sim]\nkind = "openai"\nbase_url = "{base_url}"\ntimeout_s = 10\n{key}']
    for size, tier, ref in (("small", 1, "gpt-4o-mini"), ("medium", 2, "gpt-4.1-mini"),
                            ("large", 3, "gpt-4o")):
        parts.append(f'[models.sim-{size}]\nprovider = "sim"\ntier = {tier}\n'
                     f'price_ref = "{ref}"\nprice_provider = "openai"\n')
    checks = 'validators = [{ type = "non_empty" }, { type = "finish_reason" }]\n'
    for task in ("default", "classify", "extract", "summarize", "code"):
        parts.append(f"[tasks.{task}]\nladder = [1, 2, 3]\n{checks}")
    parts.append(f"[simulator]\nseed = 7\n[simulator.default]\nfail_rate = 0.1\n{latency}")
    for size, rate in (("small", 0.3), ("medium", 0.1), ("large", 0.02)):
        parts.append(f"[simulator.models.sim-{size}]\nfail_rate = {rate}\n{latency}")
    return "\n".join(parts)


@pytest.fixture
def sim_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, SimServer]]:
    """A simulator over HTTP in this process and a config TOML pointing at it."""
    import tomllib

    probe = tomllib.loads(config_toml("http://x"))
    server = SimServer(SimConfig.from_dict(probe["simulator"])).start()
    path = tmp_path / "batchroute.toml"
    path.write_text(config_toml(f"{server.url}/v1"))
    monkeypatch.setenv("BATCHROUTE_CONFIG", str(path))
    try:
        yield path, server
    finally:
        server.stop()


def make_batch(path: Path, n: int) -> Path:
    """n short classify requests; a third of the answers fail the choices check on tier 1."""
    topics = ["a late delivery", "a broken hinge", "a double charge", "a password reset",
              "a feature idea", "a thank-you note", "a cancelled order", "an app crash"]
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({
                "custom_id": f"job-{i:05d}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "auto", "max_tokens": 5, "messages": [
                    {"role": "user", "content": f"Ticket {i} is about {topics[i % 8]}. Is it "
                                                "a complaint? Answer with one of: yes, no."}]},
                "batchroute": {"task": "classify", "validators": [
                    {"type": "choices", "choices": ["yes", "no"]}]}}) + "\n")
    return path


def submit(path: Path) -> tuple[str, int]:
    res = CliRunner().invoke(main, ["submit", str(path), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    return data["batch_id"], data["jobs"]


def finished(store: Store, batch_id: str) -> int:
    counts = store.state_counts(batch_id)
    return sum(counts.get(s, 0) for s in FINISHED)


def check_exactly_once(store: Store, batch_id: str, jobs: int, tmp_path: Path,
                       sim: SimServer | None = None) -> dict[str, Any]:
    """Every job once in the output; the ledger: no (job, attempt) twice, attempts 1..n,
    no provider call counted twice."""
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    res = CliRunner().invoke(main, ["results", batch_id, "-o", str(out), "--errors", str(err)])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for p in (out, err) for x in p.read_text().splitlines()]
    ids = [x["custom_id"] for x in lines]
    assert len(ids) == jobs and len(set(ids)) == jobs, "a job is missing or written twice"

    attempts = store.attempts(batch_id)
    per_job: dict[str, list[int]] = defaultdict(list)
    for a in attempts:
        per_job[a.job_id].append(a.attempt_no)
    final = {j.id: j.attempt_no for j in store.iter_jobs(batch_id)}
    for job_id, nos in per_job.items():
        assert sorted(nos) == list(range(1, len(nos) + 1)), f"{job_id}: attempts {sorted(nos)}"
        assert len(nos) == final[job_id], f"{job_id}: ledger {nos} vs job at {final[job_id]}"
    assert set(per_job) == set(final)
    billed = [a for a in attempts if a.outcome != LOST]
    request_ids = [a.request_id for a in billed]
    assert all(request_ids) and len(set(request_ids)) == len(request_ids), \
        "one provider call recorded twice"
    if sim is not None:
        assert len(billed) <= sim.stats()["requests"]
    report = json.loads(CliRunner().invoke(main, ["report", batch_id, "--json"]).stdout)
    assert report["cost_usd"] == pytest.approx(sum(a.cost_usd for a in attempts), abs=1e-9)
    assert report["succeeded"] + report["failed"] == jobs
    return {"lost": len(attempts) - len(billed), "attempts": len(attempts), "report": report}


def recover(stale_after: float = 3) -> dict[str, Any]:
    res = CliRunner().invoke(main, ["recover", "--stale-after", str(stale_after), "--json"])
    assert res.exit_code == 0, res.output
    return dict(json.loads(res.stdout))


# ---- worker SIGKILL ----------------------------------------------------------------------
def test_sigkilled_workers_lose_nothing_and_bill_nothing_twice(
        start_worker: Any, sim_config: tuple[Path, SimServer], own_broker: DedicatedRedis,
        tmp_path: Path) -> None:
    cfg, sim = sim_config
    # A project budget with leases short enough to watch: a call may take 3 s (timeout 3 s
    # x factor 1), and a hold nobody settles comes back 1 s after that.
    cfg.write_text(cfg.read_text().replace("timeout_s = 10\n",
                                           "timeout_s = 3\ndeadline_factor = 1\n")
                   + "\n[budget]\nproject_usd = 1000\nhold_grace_s = 1\n")
    env = {"BATCHROUTE_CONFIG": str(cfg), "BATCHROUTE_BROKER_URL": own_broker.url,
           **FAST_RECOVERY}
    batch_id, jobs = submit(make_batch(tmp_path / "big.jsonl", 2000))
    assert jobs == 2000
    store = Store()
    # Two workers; each kill takes one down mid-call and a fresh one replaces it, while
    # the other keeps the batch moving.
    workers = [start_worker(concurrency=8, **env), start_worker(concurrency=8, **env)]
    swept: dict[str, int] = defaultdict(int)

    def sweep_once() -> None:
        for key, value in recover().items():
            if isinstance(value, int) and not isinstance(value, bool):
                swept[key] += value

    started = time.monotonic()
    for i, kill_at in enumerate((250, 800, 1350)):
        wait_for(lambda k=kill_at: finished(store, batch_id) >= k, 40,
                 f"{kill_at} jobs done; worker log:\n{workers[-1].log()[-2000:]}")
        victim = workers[i % 2]
        running = store.state_counts(batch_id).get("running", 0)
        victim.kill(signal.SIGKILL)
        victim.proc.wait(timeout=10)
        assert running > 0, "the kill should land while calls are in flight"
        workers[i % 2] = start_worker(concurrency=8, **env)
        sweep_once()

    def done_or_sweep() -> bool:
        if finished(store, batch_id) >= jobs:
            return True
        sweep_once()
        return False

    wait_for(done_or_sweep, 60, f"the batch to finish after the kills; counts "
             f"{store.state_counts(batch_id)}; log:\n{workers[-1].log()[-2000:]}",
             interval=1.0)
    elapsed = time.monotonic() - started
    ledger = check_exactly_once(store, batch_id, jobs, tmp_path, sim)
    # The kills did hit calls in flight: their runs were found dead and their numbers kept.
    # The messages the dead workers had reserved come back either through kombu's own
    # restore of unacked messages or through the sweeper (`republished`): which one wins
    # the race varies from run to run, and check_exactly_once holds either way (the
    # sweeper's republish rules are tested in test_recovery.py).
    assert swept["dead_requeued"] > 0 and ledger["lost"] > 0
    # The killed calls' budget holds were never settled: they lapse, and nothing stays
    # reserved on the project's counter (before leases, each kill's holds stayed for good).
    import redis

    from batchroute.budget import RedisBudgets

    budgets = RedisBudgets(redis.Redis.from_url(own_broker.url))
    wait_for(lambda: budgets.usage("project", lambda: 0.0)[1] < 1e-9, 20,
             f"the dead holders' reservations to lapse: {budgets.usage('project', lambda: 0.0)}")
    print(f"2000 jobs, 3 SIGKILLs: {elapsed:.1f}s, {ledger['attempts']} attempts, "
          f"{ledger['lost']} lost runs, sweeps {dict(swept)}")


# ---- Redis restarted with its data gone --------------------------------------------------
def test_redis_restarted_empty_mid_batch_loses_nothing(
        start_worker: Any, sim_config: tuple[Path, SimServer], own_broker: DedicatedRedis,
        tmp_path: Path) -> None:
    import redis

    cfg, sim = sim_config
    env = {"BATCHROUTE_CONFIG": str(cfg), "BATCHROUTE_BROKER_URL": own_broker.url,
           **FAST_RECOVERY}
    batch_id, jobs = submit(make_batch(tmp_path / "big.jsonl", 1000))
    store = Store()
    workers = [start_worker(concurrency=8, **env), start_worker(concurrency=8, **env)]
    restarted = 0

    def supervise() -> None:
        """What `restart: unless-stopped` does in docker-compose.yml: Celery 5.7 workers
        can exit on a broker connection loss (kombu's channel close raises
        AttributeError 'hostname' while restoring unacked messages); start a new one."""
        nonlocal restarted
        for i, w in enumerate(workers):
            if w.proc.poll() is not None:
                workers[i] = start_worker(concurrency=8, **env)
                restarted += 1

    def done_or_supervise() -> bool:
        supervise()
        return finished(store, batch_id) >= jobs

    # The sweeper runs on its own, as in production: beat schedules it, a worker runs it.
    beat_log = (tmp_path / "beat.log").open("wb")
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers", "beat", "-l", "WARNING",
         "-s", str(tmp_path / "beat-schedule")],
        cwd=ROOT, env={**os.environ, **env}, stdout=beat_log, stderr=subprocess.STDOUT,
        start_new_session=True)
    logs: list[str] = []
    try:
        wait_for(lambda: finished(store, batch_id) >= 250, 40,
                 f"250 jobs done; log:\n{workers[0].log()[-2000:]}")
        client = redis.Redis.from_url(own_broker.url)
        queued_before = client.llen("batchroute.sim")
        run_id = client.info("server")["run_id"]
        assert queued_before > 100  # what is about to be lost
        own_broker.kill()
        time.sleep(1.0)
        own_broker.start()
        # A new server, empty: at most the few messages in-flight tasks published since.
        assert client.info("server")["run_id"] != run_id
        assert client.llen("batchroute.sim") < 20
        wait_for(done_or_supervise, 90,
                 f"the batch to finish after the Redis restart; counts "
                 f"{store.state_counts(batch_id)}; worker log:\n{workers[0].log()[-3000:]}",
                 interval=0.5)
    finally:
        os.killpg(beat.pid, signal.SIGTERM)
        beat.wait(timeout=15)
        beat_log.close()
        logs = [p.read_text(errors="replace") for p in tmp_path.glob("worker*.log")]
    check_exactly_once(store, batch_id, jobs, tmp_path, sim)
    # Beat's sweeps, run by the workers, published the lost messages again.
    assert any("lost_messages_republished" in text for text in logs)
    print(f"Redis restarted empty: {jobs} jobs finished once; {restarted} worker(s) "
          "restarted by the supervisor")


# ---- cancel and resume through the broker ------------------------------------------------
def test_cancel_mid_batch_then_resume_through_celery(
        start_worker: Any, sim_config: tuple[Path, SimServer], own_broker: DedicatedRedis,
        tmp_path: Path) -> None:
    cfg, sim = sim_config
    batch_id, jobs = submit(make_batch(tmp_path / "b.jsonl", 200))
    store = Store()
    start_worker(concurrency=8, BATCHROUTE_CONFIG=str(cfg), BATCHROUTE_BROKER_URL=own_broker.url)
    wait_for(lambda: finished(store, batch_id) >= 40, 30, "40 jobs done", interval=0.05)
    res = CliRunner().invoke(main, ["cancel", batch_id, "--json"])
    assert res.exit_code == 0, res.output
    cancelled = json.loads(res.stdout)
    assert cancelled["cancelled_queued"] > 0
    counts = store.state_counts(batch_id)
    assert counts.get("queued", 0) == 0 and counts.get("running", 0) == 0
    done_at_cancel = counts.get("succeeded", 0) + counts.get("failed", 0)
    time.sleep(1.5)  # the worker drains the queue: every message claims nothing
    counts = store.state_counts(batch_id)
    assert counts.get("succeeded", 0) + counts.get("failed", 0) == done_at_cancel
    attempts_before = {j.id: j.attempt_no for j in store.iter_jobs(batch_id)
                       if j.state in ("succeeded", "failed")}

    res = CliRunner().invoke(main, ["resume", batch_id, "--json"])
    assert res.exit_code == 0, res.output
    resumed = json.loads(res.stdout)
    assert resumed["reopened"] == jobs - done_at_cancel
    wait_for(lambda: finished(store, batch_id) >= jobs
             and store.state_counts(batch_id).get("cancelled", 0) == 0, 60,
             f"the resumed batch to finish: {store.state_counts(batch_id)}", interval=0.2)
    check_exactly_once(store, batch_id, jobs, tmp_path, sim)
    # Jobs finished before the cancel were not run again.
    after = {j.id: (j.state, j.attempt_no) for j in store.iter_jobs(batch_id)}
    assert all(after[i][1] == n for i, n in attempts_before.items())


# ---- security ----------------------------------------------------------------------------
class _Evil:
    """Unpickling this would create a file: the proof that pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_a_pickle_message_is_refused_and_runs_no_code(start_worker: Any,
                                                      own_broker: DedicatedRedis,
                                                      tmp_path: Path) -> None:
    import redis
    from kombu import Connection

    from batchroute.broker import TASK_NAME

    marker = tmp_path / "pwned"
    redis_url = own_broker.url
    worker = start_worker(concurrency=2, BATCHROUTE_BROKER_URL=redis_url)
    body = pickle.dumps(((_Evil(marker), 1), {}, {"callbacks": None, "errbacks": None,
                                                  "chain": None, "chord": None}))
    with Connection(redis_url) as conn:
        producer = conn.Producer()
        # The default exchange routes straight to the queue named by the routing key.
        producer.publish(body, routing_key="batchroute.sim", exchange="",
                         content_type="application/x-python-serialize",
                         content_encoding="binary",
                         headers={"lang": "py", "task": TASK_NAME, "id": "evil-1",
                                  "argsrepr": "()", "kwargsrepr": "{}"})
    client = redis.Redis.from_url(redis_url)
    wait_for(lambda: "untrusted content" in worker.log(), 30,
             f"the worker to refuse the pickle message; log:\n{worker.log()[-2000:]}")
    wait_for(lambda: client.llen("batchroute.sim") == 0, 10, "the queue to drain")
    assert not marker.exists(), "unpickling ran code in the worker"
    assert "application/x-python-serialize" in worker.log()
    # The worker is still serving ordinary jobs.
    from batchroute import Client

    handle = Client.from_env().enqueue(messages=[{"role": "user", "content": "Say hi."}])
    assert handle.wait(timeout=30).content
    assert not marker.exists()


def test_flower_requires_basic_auth(own_broker: DedicatedRedis, tmp_path: Path) -> None:
    import httpx

    port = free_port()
    log_path = tmp_path / "flower.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers", "flower", f"--port={port}",
             "--address=127.0.0.1"],
            cwd=ROOT, env={**os.environ, "FLOWER_BASIC_AUTH": "ops:s3cret-pass"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}/"

            def up() -> bool:
                try:
                    httpx.get(url, timeout=1)
                    return True
                except httpx.HTTPError:
                    return False

            wait_for(up, 30, f"flower to listen; log:\n{log_path.read_text()[-2000:]}", 0.2)
            assert httpx.get(url, timeout=5).status_code == 401
            assert httpx.get(url, auth=("ops", "wrong"), timeout=5).status_code == 401
            assert httpx.get(url, auth=("ops", "s3cret-pass"), timeout=5).status_code == 200
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
    assert "s3cret-pass" not in log_path.read_text()


def test_compose_file_keeps_secrets_out_and_flower_behind_auth() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "FLOWER_BASIC_AUTH: ${FLOWER_BASIC_AUTH:?" in compose
    assert "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?" in compose
    assert "batchroute:batchroute@" not in compose  # no password in a URL
    assert "--maxmemory-policy" in compose and "noeviction" in compose


def test_no_secret_reaches_any_artefact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capfd: pytest.CaptureFixture[str],
                                        own_broker: DedicatedRedis) -> None:
    import redis

    from batchroute.logs import configure_logging

    secret = "sk-live-DO-NOT-LEAK-4f9a2c7e1b"
    monkeypatch.setenv("BR_TEST_PROVIDER_KEY", secret)
    cfg = tmp_path / "keyed.toml"
    cfg.write_text(config_toml("sim://", api_key_env="BR_TEST_PROVIDER_KEY"))
    monkeypatch.setenv("BATCHROUTE_CONFIG", str(cfg))
    configure_logging(level="DEBUG", fmt="json")
    out, err, rep = tmp_path / "out.jsonl", tmp_path / "err.jsonl", tmp_path / "report.json"
    res = CliRunner().invoke(main, ["-v", "run", str(EXAMPLE), "-o", str(out), "--errors",
                                    str(err), "--report-json", str(rep)])
    assert res.exit_code == 0, res.output
    res2 = CliRunner().invoke(main, ["submit", str(make_batch(tmp_path / "s.jsonl", 20)),
                                     "--json"])
    assert res2.exit_code == 0, res2.output
    captured = capfd.readouterr()
    broker = redis.Redis.from_url(own_broker.url)
    messages = b"".join(cast(list[bytes], broker.lrange("batchroute.sim", 0, -1)))
    assert len(messages) > 0
    database = b"".join(p.read_bytes() for p in tmp_path.glob("test.db*"))  # + WAL
    engine = Store().engine  # every row of every table, whichever the store
    with engine.connect() as conn:
        for table in SQLModel.metadata.sorted_tables:
            database += repr(conn.execute(table.select()).all()).encode()
    for name, blob in (("database", database), ("results", out.read_bytes()),
                       ("errors", err.read_bytes()), ("report", rep.read_bytes()),
                       ("cli output", res.output.encode() + res2.output.encode()),
                       ("logs", (captured.out + captured.err).encode()),
                       ("broker messages", messages)):
        assert secret.encode() not in blob, f"the API key leaked into the {name}"
    # Broker messages carry ids only: no prompt text either.
    assert b"Categorise this ticket" not in messages
