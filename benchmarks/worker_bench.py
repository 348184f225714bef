"""Worker throughput: batchroute's per-job overhead, and how well it hides provider latency.

All real processes: the simulator as its own server (`batchroute sim`), one
`celery -A workers worker --pool threads` process, Redis as broker, PostgreSQL as store.

* **overhead** (`--latency-ms 0`): jobs/s of one batchroute worker (claim, call the
  zero-latency simulator over HTTP, validate, record the attempt and finish) against one
  bare Celery worker running a no-op task with the same settings
  (`benchmarks/noop_worker.py`), one message per task, on the same broker, in the same
  run (before and after it, averaged: this VM's speed drifts by ±20%). The batch is
  published as `batchroute submit` does: several jobs per message for a
  publish this large (`batchroute.publish.chunk_size`; `--chunk-size 1` for one each);
* **latency hiding** (`--latency-ms 2000 --concurrency 64`): jobs/s against the ideal
  concurrency / latency (32 jobs/s), end to end and in the steady state (between the
  10th and the 90th percentile of finish times).

Jobs are published after the worker is up and warm (a warm-up batch runs first); the
clock runs from publishing to the last job finished (batchroute: the store says so;
no-op: the queue and the unacked set are empty). Every answer passes its checks
(fail_rate 0), so each job is one attempt.

    python benchmarks/worker_bench.py overhead            # --jobs 3000 --concurrency 32
    python benchmarks/worker_bench.py latency             # --jobs 768 --concurrency 64
    options: --jobs N --concurrency N --chunk-size N --json

Needs Redis on 127.0.0.1:6379 (uses db 11 and flushes it) and PostgreSQL on
127.0.0.1:5432 as user postgres (a fresh database is created and dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.ingest_bench import fresh_database, pg_admin  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/11"
QUEUE = "batchroute.bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, port: int, latency_ms: float) -> None:
    models = "".join(
        f'[models.bench-{size}]\nprovider = "bench"\ntier = {tier}\nprice_ref = "{ref}"\n'
        f'price_provider = "openai"\n\n'
        for size, tier, ref in (("small", 1, "gpt-4o-mini"), ("medium", 2, "gpt-4.1-mini"),
                                ("large", 3, "gpt-4o")))
    path.write_text(
        f'[providers.bench]\nkind = "openai"\nbase_url = "http://127.0.0.1:{port}/v1"\n'
        f"timeout_s = 30\n\n{models}"
        '[tasks.default]\nladder = [1, 2, 3]\nvalidators = [{ type = "non_empty" }]\n\n'
        "[cascade]\nenabled = false\n\n"
        f"[simulator]\nseed = 7\n[simulator.default]\nfail_rate = 0.0\n"
        f"latency_ms = {latency_ms}\n")


def make_lines(path: Path, n: int, tag: str) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"{tag}-{i}", "body": {
                "model": "auto", "max_tokens": 8,
                "messages": [{"role": "user", "content": f"Say hello to number {i}."}]}})
                    + "\n")
    return path


class Proc:
    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (Linux /proc): per job, a figure that a
    busy machine disturbs far less than jobs/s."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if predicate():
            return time.perf_counter()
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")


def worker_cmd(app: str, queue: str, concurrency: int) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", app, "worker", "--pool", "threads",
            "-c", str(concurrency), "-Q", queue, "--without-gossip", "--without-mingle",
            "-l", "WARNING", "-n", f"bench-{app}-{os.getpid()}@%h"]


def run_batchroute(env: dict[str, str], config: Path, tmp: Path, jobs: int,
                   concurrency: int) -> dict[str, Any]:
    from batchroute.config import load_config
    from batchroute.dispatch import CeleryDispatcher
    from batchroute.ingest import ingest_file
    from batchroute.store import FINISHED, Store, get_engine

    cfg = load_config(str(config))
    store = Store(get_engine(env["BATCHROUTE_DATABASE_URL"]))
    dispatcher = CeleryDispatcher()
    worker = Proc(worker_cmd("workers", QUEUE, concurrency), env, tmp / "worker.log")

    def finished(batch_id: str) -> int:
        counts = store.state_counts(batch_id)
        return sum(counts.get(s, 0) for s in FINISHED)

    def publish(batch_id: str) -> None:
        queued = store.queued_jobs(batch_id)
        dispatcher.enqueue_many([(i, n, cfg.providers[p].queue) for i, n, p in queued])

    try:
        warm = ingest_file(cfg, store, None, make_lines(tmp / "warm.jsonl", 200, "warm"))
        publish(warm.batch_id)
        wait(lambda: finished(warm.batch_id) >= 200, 120,
             f"the warm-up batch; worker log: {worker.log_path}", 0.2)
        batch = ingest_file(cfg, store, None, make_lines(tmp / "run.jsonl", jobs, "run"))
        cpu0 = cpu_seconds(worker.proc.pid)
        t0 = time.perf_counter()
        publish(batch.batch_id)
        t1 = wait(lambda: finished(batch.batch_id) >= jobs, 1800, "the batch", 0.05)
        cpu = cpu_seconds(worker.proc.pid) - cpu0
    finally:
        worker.stop()
    times = sorted(j.finished_at.timestamp() for j in store.iter_jobs(batch.batch_id)
                   if j.finished_at is not None)
    lo, hi = times[len(times) // 10], times[(len(times) * 9) // 10]
    attempts = len(store.attempts(batch.batch_id))
    counts = store.state_counts(batch.batch_id)
    return {"jobs": jobs, "attempts": attempts, "succeeded": counts.get("succeeded", 0),
            "seconds": round(t1 - t0, 2), "jobs_per_s": round(jobs / (t1 - t0), 1),
            "worker_cpu_ms_per_job": round(1000 * cpu / jobs, 3),
            "steady_jobs_per_s": round((len(times) * 0.8) / (hi - lo), 1) if hi > lo else None}


def run_noop(env: dict[str, str], tmp: Path, jobs: int, concurrency: int,
             sleep_ms: float = 0.0) -> dict[str, Any]:
    import redis

    from batchroute.publish import RedisBulkPublisher
    from benchmarks.noop_worker import NOOP_TASK
    from benchmarks.noop_worker import app as noop_app

    client = redis.Redis.from_url(REDIS_URL)
    pub = RedisBulkPublisher(noop_app, task_name=NOOP_TASK)
    worker = Proc(worker_cmd("benchmarks.noop_worker", "bench.noop", concurrency),
                  {**env, "BENCH_NOOP_SLEEP_MS": str(sleep_ms)}, tmp / f"noop{sleep_ms:g}.log")

    def drained() -> bool:
        return int(client.llen("bench.noop")) == 0 and int(client.hlen("unacked")) == 0

    try:
        pub.publish([(f"warm{i}", 1, "bench.noop") for i in range(200)])
        wait(drained, 120, f"the no-op warm-up; worker log: {worker.log_path}", 0.1)
        cpu0 = cpu_seconds(worker.proc.pid)
        t0 = time.perf_counter()
        pub.publish([(f"j{i}", 1, "bench.noop") for i in range(jobs)])
        t1 = wait(drained, 600, "the no-op batch", 0.01)
        cpu = cpu_seconds(worker.proc.pid) - cpu0
    finally:
        worker.stop()
    return {"jobs": jobs, "seconds": round(t1 - t0, 2), "jobs_per_s": round(jobs / (t1 - t0), 1),
            "worker_cpu_ms_per_job": round(1000 * cpu / jobs, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["overhead", "latency"])
    ap.add_argument("--jobs", type=int)
    ap.add_argument("--concurrency", type=int)
    ap.add_argument("--latency-ms", type=float)
    ap.add_argument("--sleepy-noop-ms", type=float, default=0.0,
                    help="overhead: also run a no-op that sleeps this long (a task as slow "
                         "as a job, with none of its work)")
    ap.add_argument("--chunk-size", type=int,
                    help="most jobs per message (BATCHROUTE_CHUNK_SIZE; 1: one job each)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.chunk_size is not None:
        os.environ["BATCHROUTE_CHUNK_SIZE"] = str(a.chunk_size)
    overhead = a.mode == "overhead"
    jobs = a.jobs or (3000 if overhead else 768)
    concurrency = a.concurrency or (32 if overhead else 64)
    latency_ms = a.latency_ms if a.latency_ms is not None else (0.0 if overhead else 2000.0)

    import redis

    from batchroute.logs import configure_logging

    configure_logging(level="WARNING")
    redis.Redis.from_url(REDIS_URL).flushdb()
    os.environ["BATCHROUTE_BROKER_URL"] = REDIS_URL
    db = f"batchroute_bench_worker_{os.getpid()}"
    url = fresh_database(db)
    from batchroute.dispatch import max_chunk
    from batchroute.publish import chunk_size

    out: dict[str, Any] = {"mode": a.mode, "machine": f"{os.cpu_count()} CPUs, Python "
                           f"{platform.python_version()}", "concurrency": concurrency,
                           "latency_ms": latency_ms,
                           "jobs_per_message": chunk_size(jobs, max_chunk())}
    sim: Proc | None = None
    try:
        with tempfile.TemporaryDirectory() as t:
            tmp = Path(t)
            port = free_port()
            config = tmp / "bench.toml"
            write_config(config, port, latency_ms)
            env = {**os.environ, "BATCHROUTE_CONFIG": str(config), "BATCHROUTE_DATABASE_URL":
                   url, "BATCHROUTE_BROKER_URL": REDIS_URL, "BATCHROUTE_LOG_FORMAT": "json",
                   "BATCHROUTE_WORKER_CONCURRENCY": str(concurrency)}
            os.environ["BATCHROUTE_CONFIG"] = str(config)
            sim = Proc([sys.executable, "-m", "batchroute.cli", "--config", str(config), "sim",
                        "--port", str(port)], env, tmp / "sim.log")

            def sim_up() -> bool:
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1) \
                        .status_code < 500
                except httpx.HTTPError:
                    return False

            wait(sim_up, 60, "the simulator", 0.2)
            if overhead:  # the baseline before and after: this VM's speed drifts
                before = run_noop(env, tmp, jobs, concurrency)
            out["batchroute"] = run_batchroute(env, config, tmp, jobs, concurrency)
            if overhead:
                after = run_noop(env, tmp, jobs, concurrency)
                out["noop_runs"] = [before, after]
                out["noop"] = {"jobs": jobs, "seconds": round(
                    (before["seconds"] + after["seconds"]) / 2, 2)}
                out["noop"]["jobs_per_s"] = round(jobs / out["noop"]["seconds"], 1)
                out["noop"]["worker_cpu_ms_per_job"] = round(
                    (before["worker_cpu_ms_per_job"] + after["worker_cpu_ms_per_job"]) / 2, 3)
                if a.sleepy_noop_ms:
                    out["sleepy_noop"] = run_noop(env, tmp, jobs, concurrency,
                                                  a.sleepy_noop_ms)
                out["ratio"] = round(out["batchroute"]["jobs_per_s"]
                                     / out["noop"]["jobs_per_s"], 3)
                # The same comparison in CPU: no-op's CPU per task / batchroute's per job.
                out["cpu_ratio"] = round(out["noop"]["worker_cpu_ms_per_job"]
                                         / out["batchroute"]["worker_cpu_ms_per_job"], 3)
            else:
                ideal = concurrency / (latency_ms / 1000)
                out["ideal_jobs_per_s"] = ideal
                out["share_of_ideal"] = round(out["batchroute"]["jobs_per_s"] / ideal, 3)
                steady = out["batchroute"]["steady_jobs_per_s"]
                out["steady_share_of_ideal"] = round(steady / ideal, 3) if steady else None
    finally:
        if sim is not None:
            sim.stop()
        from batchroute import store as store_module

        for engine in list(store_module._engines.values()):
            engine.dispose()
        pg_admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        redis.Redis.from_url(REDIS_URL).flushdb()
    if a.json:
        print(json.dumps(out, indent=2))
        return
    b = out["batchroute"]
    print(f"machine: {out['machine']}; one worker, threads pool, -c {concurrency}; simulator "
          f"latency {latency_ms:g} ms; PostgreSQL store; {out['jobs_per_message']} jobs per "
          "message")
    print(f"batchroute: {b['jobs']} jobs ({b['attempts']} attempts) in {b['seconds']} s = "
          f"{b['jobs_per_s']} jobs/s (steady state {b['steady_jobs_per_s']} jobs/s)")
    if overhead:
        n = out["noop"]
        runs = " and ".join(f"{r['jobs_per_s']}" for r in out["noop_runs"])
        print(f"bare Celery no-op: {n['jobs']} tasks in {n['seconds']} s = {n['jobs_per_s']} "
              f"tasks/s (mean time of a run before and one after: {runs} tasks/s)")
        print(f"batchroute / no-op: {out['ratio']:.1%}")
        print(f"worker CPU per job: batchroute {b['worker_cpu_ms_per_job']} ms, no-op "
              f"{n['worker_cpu_ms_per_job']} ms (ratio {out['cpu_ratio']:.1%})")
        if "sleepy_noop" in out:
            z = out["sleepy_noop"]
            print(f"no-op sleeping {a.sleepy_noop_ms:g} ms: {z['jobs_per_s']} tasks/s, worker "
                  f"CPU {z['worker_cpu_ms_per_job']} ms per task")
    else:
        print(f"ideal (concurrency / latency): {out['ideal_jobs_per_s']:g} jobs/s; "
              f"achieved {out['share_of_ideal']:.1%} end to end, "
              f"{out['steady_share_of_ideal']:.1%} in the steady state")


if __name__ == "__main__":
    main()
