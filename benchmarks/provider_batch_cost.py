"""Provider batch mode against the same routing run synchronously (issue #18).

    python benchmarks/provider_batch_cost.py [--jobs 10000] [--json]

Both runs use the simulator with published prices (genai-prices: gpt-4o-mini, gpt-4.1-mini,
gpt-4o) and the same seed, so the same request gets the same answer either way and the
routing (which tier each job ends on) is the same:

1. **synchronous**: the embedded runner, `--no-provider-batch`.
2. **provider batches**: `batchroute submit` to 2 Celery workers and beat, the simulator's
   OpenAI Batch API taking `--delay-s` per provider batch, at most `--max-requests` per
   provider batch, and the *first* provider batch expiring after half its requests. While
   provider batches are in flight, one worker and beat are SIGKILLed, then started again.

Printed: cost of each, their ratio (goal <= 0.52), provider batches by status, and the
exactly-once checks (one output line per input line, no attempt number twice, nothing
left unfinished).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis
import tomli_w

from batchroute.config import parse_config
from batchroute.embedded import run_file
from batchroute.logs import configure_logging
from batchroute.sim import SimConfig, SimServer
from batchroute.store import FINISHED, LOST, Store, get_engine
from batchroute.store import provider_batches as spb

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "jobs" / "examples" / "support_batch.jsonl"


def config(base_url: str, delay_s: float, max_requests: int) -> dict[str, Any]:
    models = {f"sim-{size}": {"provider": "sim", "tier": tier, "price_ref": ref,
                              "price_provider": "openai"}
              for size, tier, ref in (("small", 1, "gpt-4o-mini"), ("medium", 2, "gpt-4.1-mini"),
                                      ("large", 3, "gpt-4o"))}
    checks = [{"type": "non_empty"}, {"type": "finish_reason"}]
    tasks = {t: {"ladder": [1, 2, 3], "validators": checks}
             for t in ("default", "classify", "extract", "summarize", "code")}
    return {
        "providers": {"sim": {"kind": "openai", "base_url": base_url, "timeout_s": 30,
                              "batch": True}},
        "models": models, "tasks": tasks,
        "provider_batch": {"gather_s": 5.0, "poll_s": 1.0, "max_requests": max_requests,
                           "lease_s": 10.0, "submit_timeout_s": 10.0},
        "simulator": {"seed": 7, "default": {"fail_rate": 0.1},
                      "models": {"sim-small": {"fail_rate": 0.3},
                                 "sim-medium": {"fail_rate": 0.1},
                                 "sim-large": {"fail_rate": 0.02}},
                      "batch": {"delay_s": delay_s, "expire_fraction": 0.5,
                                "expire_batches": 1}},
    }


def make_batch(n: int, path: Path) -> Path:
    lines = [json.loads(x) for x in EXAMPLE.read_text().splitlines() if x.strip()]
    with path.open("w") as f:
        for i in range(n):
            obj = json.loads(json.dumps(lines[i % len(lines)]))
            obj["custom_id"] = f"pb-{i:05d}"
            obj["body"]["messages"][-1]["content"] = f"[{i}] " + str(
                obj["body"]["messages"][-1]["content"])
            f.write(json.dumps(obj) + "\n")
    return path


def exactly_once(store: Store, batch_id: str, n: int, out: Path) -> dict[str, Any]:
    ids = [json.loads(x)["custom_id"] for x in out.read_text().splitlines()]
    per_job: dict[str, list[int]] = {}
    for a in store.attempts(batch_id):
        per_job.setdefault(a.job_id, []).append(a.attempt_no)
    gaps = sum(1 for nos in per_job.values() if sorted(nos) != list(range(1, len(nos) + 1)))
    counts = store.state_counts(batch_id)
    return {"output_lines": len(ids), "unique_custom_ids": len(set(ids)),
            "jobs_finished": sum(counts.get(s, 0) for s in FINISHED),
            "jobs_with_attempt_gaps_or_doubles": gaps, "states": counts, "ok": (
                len(ids) == n == len(set(ids)) and gaps == 0
                and sum(counts.get(s, 0) for s in FINISHED) == n)}


def synchronous(src: Path, folder: Path, delay_s: float, max_requests: int) -> dict[str, Any]:
    probe = config("http://x", delay_s, max_requests)
    server = SimServer(SimConfig.from_dict(probe["simulator"])).start()
    try:
        cfg = parse_config(config(f"{server.url}/v1", delay_s, max_requests))
        store = Store(get_engine(f"sqlite:///{folder / 'sync.db'}"))
        started = time.monotonic()
        res = run_file(src, folder / "sync.jsonl", config=cfg, store=store, concurrency=32,
                       provider_batch=False, reuse_mode="off")
        return {"wall_s": round(time.monotonic() - started, 1), "report": res.report,
                "checks": exactly_once(store, res.ingest.batch_id, res.report["jobs"],
                                       folder / "sync.jsonl")}
    finally:
        server.stop()


class Celery:
    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.env, self.folder = env, folder
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        if name.startswith("beat"):
            cmd = ["beat", "-l", "WARNING", "-s", str(self.folder / f"{name}-{time.time_ns()}")]
        else:
            cmd = ["worker", "--pool", "threads", "-c", "16", "--without-gossip",
                   "--without-mingle", "-l", "WARNING", "-n", f"{name}.{time.time_ns()}@%h"]
        log = (self.folder / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers", *cmd], cwd=ROOT,
            env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def kill(self, name: str) -> None:
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait()

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def batched(src: Path, folder: Path, delay_s: float, max_requests: int,
            broker: str) -> dict[str, Any]:
    probe = config("http://x", delay_s, max_requests)
    server = SimServer(SimConfig.from_dict(probe["simulator"])).start()
    cfg_path = folder / "batch.toml"
    cfg_path.write_text(tomli_w.dumps(config(f"{server.url}/v1", delay_s, max_requests)))
    db = f"sqlite:///{folder / 'batch.db'}"
    env = {"BATCHROUTE_CONFIG": str(cfg_path), "BATCHROUTE_BROKER_URL": broker,
           "BATCHROUTE_DATABASE_URL": db, "BATCHROUTE_TASK_EVENTS": "0",
           "BATCHROUTE_PROVIDER_BATCH_TICK_S": "1", "BATCHROUTE_SWEEP_INTERVAL_S": "5",
           "BATCHROUTE_LEASE_S": "30", "BATCHROUTE_TASK_TIME_LIMIT_S": "20",
           "BATCHROUTE_STALE_QUEUED_S": "30", "BATCHROUTE_LOG_LEVEL": "WARNING"}
    redis.Redis.from_url(broker).flushdb()
    store = Store(get_engine(db))
    celery = Celery(env, folder)
    killed: dict[str, Any] = {}
    try:
        for name in ("w1", "w2", "beat"):
            celery.start(name)
        started = time.monotonic()
        sub = subprocess.run([sys.executable, "-m", "batchroute.cli", "submit", str(src),
                              "--json", "--no-reuse"], cwd=ROOT, env={**os.environ, **env},
                             capture_output=True, text=True, check=True)
        batch_id = json.loads(sub.stdout)["batch_id"]
        n = json.loads(sub.stdout)["jobs"]
        while True:  # provider batches in flight: kill a worker and beat
            pbs = spb.of_batch(store, batch_id)
            if sum(pb.state == "submitted" for pb in pbs) >= 2:
                break
            time.sleep(0.2)
        celery.kill("w1")
        celery.kill("beat")
        killed = {"at_s": round(time.monotonic() - started, 1),
                  "provider_batches_in_flight": sum(pb.state == "submitted" for pb in pbs)}
        time.sleep(2.0)
        celery.start("w1")
        celery.start("beat")
        while True:
            counts = store.state_counts(batch_id)
            if sum(counts.get(s, 0) for s in FINISHED) >= n:
                break
            time.sleep(0.5)
        wall = time.monotonic() - started
        out = folder / "batch.jsonl"
        subprocess.run([sys.executable, "-m", "batchroute.cli", "results", batch_id, "-o",
                        str(out)], cwd=ROOT, env={**os.environ, **env}, check=True,
                       capture_output=True)
        rep = subprocess.run([sys.executable, "-m", "batchroute.cli", "report", batch_id,
                              "--json"], cwd=ROOT, env={**os.environ, **env}, check=True,
                             capture_output=True, text=True)
        attempts = store.attempts(batch_id)
        pbs = spb.of_batch(store, batch_id)
        return {"wall_s": round(wall, 1), "report": json.loads(rep.stdout), "killed": killed,
                "checks": exactly_once(store, batch_id, n, out),
                "lost_placeholders": sum(a.outcome == LOST for a in attempts),
                "provider_batches": len(pbs),
                "by_status": dict(Counter(pb.remote_status for pb in pbs)),
                "sent_to_provider": len(server.batches.all_jobs("openai")),
                "with_remote_id": sum(1 for pb in pbs if pb.remote_id)}
    finally:
        celery.stop()
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--delay-s", type=float, default=5.0,
                    help="how long the simulated provider takes per provider batch")
    ap.add_argument("--max-requests", type=int, default=2000)
    ap.add_argument("--broker", default="redis://127.0.0.1:6379/9")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("BATCHROUTE_LOG_LEVEL", "WARNING")
    configure_logging()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        src = make_batch(args.jobs, folder / "jobs.jsonl")
        sync = synchronous(src, folder, args.delay_s, args.max_requests)
        batch = batched(src, folder, args.delay_s, args.max_requests, args.broker)
    ratio = batch["report"]["cost_usd"] / sync["report"]["cost_usd"]
    result = {
        "jobs": args.jobs, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "sync": {"cost_usd": sync["report"]["cost_usd"], "wall_s": sync["wall_s"],
                 "succeeded": sync["report"]["succeeded"],
                 "failed": sync["report"]["failed"], "checks": sync["checks"]},
        "batch": {"cost_usd": batch["report"]["cost_usd"], "wall_s": batch["wall_s"],
                  "succeeded": batch["report"]["succeeded"],
                  "failed": batch["report"]["failed"],
                  "savings_by_source": batch["report"]["savings_by_source"],
                  **{k: v for k, v in batch.items() if k not in ("report", "wall_s")}},
        "cost_ratio": round(ratio, 4),
    }
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(f"{args.jobs} jobs; synchronous ${sync['report']['cost_usd']:.4f} "
              f"({sync['wall_s']} s), provider batches ${batch['report']['cost_usd']:.4f} "
              f"({batch['wall_s']} s): ratio {ratio:.4f} (goal <= 0.52)")
        print(f"provider batches: {batch['provider_batches']} {batch['by_status']}; sent to "
              f"the provider {batch['sent_to_provider']}, rows with an id "
              f"{batch['with_remote_id']}; killed {batch['killed']}")
        print(f"exactly once: sync {sync['checks']['ok']}, batch {batch['checks']['ok']} "
              f"{batch['checks']}; lost placeholders {batch['lost_placeholders']}")
    return 0 if batch["checks"]["ok"] and ratio <= 0.52 else 1


if __name__ == "__main__":
    sys.exit(main())
