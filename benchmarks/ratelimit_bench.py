"""Global rate limits under load: real Celery workers against a strict simulator.

Starts the simulator as its own server process (strict sliding-window rpm/tpm, small
latency), N real ``celery -A workers worker`` processes sharing the Redis rate-limit
pools, submits a batch and measures what the simulator served:

* achieved requests/min and tokens/min as a fraction of each limit,
* the number of 429s the simulator returned (goal: 0),
* the makespan against the lower bound max(requests / RPM, tokens / TPM).

Tokens are counted as the simulator counts them against TPM: prompt + max_tokens.
The window is the providers' 60 s by default (``--window`` changes the simulator's
window and our ``rate_window_s`` together); keep a run at least two windows long.

    python benchmarks/ratelimit_bench.py                       # TPM-bound mix, ~2.5 min
    python benchmarks/ratelimit_bench.py --jobs 1300 --prompt-words 5-30 --max-tokens 8-32
                                                               # RPM-bound mix
    options: --workers 4 --concurrency 16 --rpm 600 --tpm 60000 --latency-ms 50 --json

Needs Redis on 127.0.0.1:6379 (uses db 14 and flushes it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["order", "refund", "invoice", "delivery", "account", "password", "shipping",
         "warranty", "product", "customer", "support", "billing", "subscription", "cancel",
         "upgrade", "payment", "address", "email", "login", "error", "broken", "late",
         "damaged", "missing", "charge", "discount", "coupon", "return"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def span(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


def write_config(path: Path, port: int, a: argparse.Namespace) -> None:
    path.write_text(f"""
[providers.bench]
kind = "openai"
base_url = "http://127.0.0.1:{port}/v1"
timeout_s = 30
rpm = {a.rpm}
tpm = {a.tpm}
rate_window_s = {a.window}

[models.bench-small]
provider = "bench"
tier = 1
price = {{ input_per_mtok = 0.15, output_per_mtok = 0.60 }}

[tasks.default]
ladder = [1]
validators = []

[simulator]
seed = 7
rpm = {a.rpm}
tpm = {a.tpm}
window_s = {a.window}
[simulator.default]
fail_rate = 0.0
latency_ms = {a.latency_ms}
latency_jitter_ms = {a.latency_ms * 0.4}
""")


def write_batch(path: Path, jobs: int, words: tuple[int, int], max_tokens: tuple[int, int],
                seed: int = 1) -> None:
    """Prompts and max_tokens of varied sizes, so request costs vary like real traffic."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(jobs):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
            f.write(json.dumps({
                "custom_id": f"rl-{i:05d}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "auto", "max_tokens": rng.randint(*max_tokens),
                         "messages": [{"role": "user", "content": f"Summarise: {text}"}]},
            }) + "\n")


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up within {timeout}s")


def start_workers(n: int, concurrency: int, env: dict[str, str], logdir: Path,
                  ) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(n):
        log = (logdir / f"worker{i}.log").open("wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers", "worker", "--pool", "threads",
             "-c", str(concurrency), "-Q", "batchroute.bench", "-n", f"bench{i}@%h",
             "--without-gossip", "--without-mingle", "-l", "WARNING"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def wait_workers(app: Any, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(app.control.ping(timeout=1.0) or []) >= n:
            return
    raise RuntimeError(f"fewer than {n} workers answered within {timeout}s")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def epoch(dt: datetime) -> float:
    """SQLite returns naive datetimes; the store writes UTC."""
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def run(a: argparse.Namespace) -> dict[str, Any]:
    import redis

    tmp = Path(tempfile.mkdtemp(prefix="br-ratelimit-"))
    print(f"work dir (config, batch, db, logs): {tmp}", file=sys.stderr)
    port = free_port()
    cfg, batch = tmp / "bench.toml", tmp / "batch.jsonl"
    write_config(cfg, port, a)
    write_batch(batch, a.jobs, span(a.prompt_words), span(a.max_tokens))
    broker = f"redis://127.0.0.1:6379/{a.redis_db}"
    redis.Redis.from_url(broker).flushdb()
    env = {**os.environ, "BATCHROUTE_CONFIG": str(cfg), "BATCHROUTE_BROKER_URL": broker,
           "BATCHROUTE_DATABASE_URL": f"sqlite:///{tmp / 'bench.db'}",
           # INFO: the bench counts the workers' rate_limited_deferred events
           "BATCHROUTE_LOG_LEVEL": "INFO", "BATCHROUTE_LOG_FORMAT": "json"}
    os.environ.update({k: env[k] for k in ("BATCHROUTE_CONFIG", "BATCHROUTE_BROKER_URL",
                                           "BATCHROUTE_DATABASE_URL")})
    os.environ["BATCHROUTE_LOG_LEVEL"] = "WARNING"

    from batchroute.broker import make_celery
    from batchroute.config import load_config
    from batchroute.dispatch import CeleryDispatcher
    from batchroute.ingest import ingest_file
    from batchroute.logs import configure_logging
    from batchroute.ratelimit import Limiter, RedisBackend
    from batchroute.store import FINISHED, Store

    configure_logging()
    sim = subprocess.Popen([sys.executable, "-m", "batchroute.cli", "--config", str(cfg), "sim",
                            "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                           stderr=(tmp / "sim.log").open("wb"), start_new_session=True)
    procs = [sim]
    try:
        sim_url = f"http://127.0.0.1:{port}"
        wait_http(f"{sim_url}/_sim/health", 30)
        procs += start_workers(a.workers, a.concurrency, env, tmp)
        app = make_celery("bench-client")
        wait_workers(app, a.workers, 90)
        # Warm the simulator up (its first request loads the tokenizer, which would bunch
        # the first second of requests into one instant), then empty its windows.
        httpx.post(f"{sim_url}/v1/chat/completions", timeout=60, json={
            "model": "warm-up", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})
        httpx.post(f"{sim_url}/_sim/reset")

        config, store = load_config(cfg), Store()
        t0 = time.time()
        result = ingest_file(config, store, CeleryDispatcher(app), batch)
        submitted = time.time() - t0
        peak: dict[str, float] = {"requests": 0.0, "tokens": 0.0, "deferred": 0.0}
        limiter = Limiter(config, RedisBackend.from_url(broker))
        deadline = t0 + a.timeout
        counts: dict[str, int] = {}
        while time.time() < deadline:
            counts = store.state_counts(result.batch_id)
            for row in limiter.usage():
                for k in peak:
                    peak[k] = max(peak[k], row[k])
            if sum(counts.get(s, 0) for s in FINISHED) >= result.jobs:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"batch not done after {a.timeout}s: {counts}")
        attempts = store.attempts(result.batch_id)
        makespan = max(epoch(x.created_at) for x in attempts) - t0
        stats = httpx.get(f"{sim_url}/_sim/stats").json()
    finally:
        stop(procs)

    deferrals = sum(p.read_text(errors="replace").count('"rate_limited_deferred"')
                    for p in tmp.glob("worker*.log"))
    caps = {j.id: int(j.body["max_tokens"]) for j in store.iter_jobs(result.batch_id)}
    served = [x for x in attempts if x.outcome != "error"]
    tokens = sum(x.prompt_tokens + caps[x.job_id] for x in served)
    requests = len(served)
    windows = makespan / a.window
    bound = max(requests / a.rpm, tokens / a.tpm) * a.window
    return {
        "jobs": result.jobs, "workers": a.workers, "concurrency": a.concurrency,
        "rpm_limit": a.rpm, "tpm_limit": a.tpm, "window_s": a.window,
        "latency_ms": a.latency_ms, "prompt_words": a.prompt_words,
        "max_tokens": a.max_tokens, "submit_s": round(submitted, 2),
        "requests": requests, "tokens": tokens, "errors": len(attempts) - requests,
        "succeeded": counts.get("succeeded", 0),
        "makespan_s": round(makespan, 1), "lower_bound_s": round(bound, 1),
        "makespan_over_bound": round(makespan / bound, 4),
        "requests_per_window": round(requests / windows, 1),
        "rpm_utilisation": round(requests / windows / a.rpm, 4),
        "tokens_per_window": round(tokens / windows),
        "tpm_utilisation": round(tokens / windows / a.tpm, 4),
        "binding": "tpm" if tokens / a.tpm >= requests / a.rpm else "rpm",
        "sim_429": int(stats["by_status"].get("429", 0)),
        "sim_refused_rpm": stats["refused_rpm"], "sim_refused_tpm": stats["refused_tpm"],
        "sim_requests": stats["requests"],
        "peak_window_requests": peak["requests"], "peak_window_tokens": peak["tokens"],
        "deferrals": deferrals, "deferrals_peak_window": peak["deferred"],
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rpm", type=int, default=600)
    ap.add_argument("--tpm", type=int, default=60000)
    ap.add_argument("--window", type=float, default=60.0,
                    help="simulator window and our rate_window_s (providers: 60)")
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--prompt-words", default="10-120", help="prompt length range (words)")
    ap.add_argument("--max-tokens", default="16-96", help="max_tokens range")
    ap.add_argument("--redis-db", type=int, default=14)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r = run(a)
    if a.json:
        print(json.dumps(r, indent=2))
        return
    binding = r["binding"]
    print(f"{r['jobs']} jobs, {r['workers']} workers x {r['concurrency']} threads, limits "
          f"rpm={r['rpm_limit']} tpm={r['tpm_limit']} per {r['window_s']:g} s, simulator "
          f"latency {r['latency_ms']:g} ms")
    print(f"  requests/window {r['requests_per_window']:>9.1f} = "
          f"{100 * r['rpm_utilisation']:.1f}% of rpm")
    print(f"  tokens/window   {r['tokens_per_window']:>9d} = "
          f"{100 * r['tpm_utilisation']:.1f}% of tpm")
    print(f"  binding limit {binding}: {100 * r[f'{binding}_utilisation']:.1f}% used")
    print(f"  simulator 429s: {r['sim_429']} (refused rpm {r['sim_refused_rpm']}, "
          f"tpm {r['sim_refused_tpm']})")
    print(f"  makespan {r['makespan_s']} s vs lower bound {r['lower_bound_s']} s "
          f"(x{r['makespan_over_bound']:.3f})")
    print(f"  succeeded {r['succeeded']}/{r['jobs']}, errors {r['errors']}, jobs put back "
          f"for capacity {r['deferrals']} times")


if __name__ == "__main__":
    main()
