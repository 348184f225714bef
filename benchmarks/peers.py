"""batchroute next to its peers on the same workloads: LiteLLM's Router and a plain loop.

Every workload runs against the project's simulator over HTTP (one model, "only"), once
per system, the systems interleaved in one run (the order rotates per workload, so VM
drift does not favour one system):

* ``batchroute``: the embedded runner (``run_file``), concurrency 64, default breaker;
* ``celery2`` (``--celery``): 2 real Celery workers (threads, 32 each) sharing Redis, the
  batch handed over by a ``batchroute submit`` process (its start-up inside the clock);
* ``celery2-app`` (``--celery``): the same workers, the batch handed over from this
  already running process (``ingest_file``), as an application enqueues it;
* ``litellm``: ``litellm.Router`` with ``num_retries=2``, 64 calls in flight (asyncio);
* ``sdk``: ``openai.AsyncOpenAI(max_retries=2)``, 64 calls in flight (asyncio).

Workloads:

* ``faults2`` / ``faults10`` / ``faults30``: 2%, 10% (5% 429 + 5% 503) and 30% (10% 429,
  10% 503, 10% 500) transient faults; Retry-After 0.7 s on the 429s. Goal: 100% of the
  jobs complete, wall time within 1.2x the SDK loop's.
* ``ratelimited``: a strict sliding-window simulator (rpm 600, tpm 60k, scaled to a 10 s
  window: rpm 100, tpm 10k per 10 s) and a token-bound batch of ~3 windows. Goal:
  makespan at most the SDK loop's, with 0 429s. ``steady``: the same for ~8 windows,
  against the bound: the makespan a perfect client reaches, computed by admitting
  each request as early as the simulator's own limiter would (``bound_s``; for a fresh
  window it is lower than tokens/TPM).

    python benchmarks/peers.py [--only faults10,ratelimited] [--systems batchroute,sdk]
                               [--celery] [--safety 0.2] [--json]

Needs ``pip install -e .[bench]`` (litellm, openai). ``--celery`` needs Redis (db 12, or
$PEERS_REDIS_DB; flushed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from batchroute.sim import SimConfig, SimModel, SimServer  # noqa: E402
from batchroute.sim.limits import Limit, RateLimiter  # noqa: E402
from batchroute.tokens import count_messages  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IN_FLIGHT = 64
WORDS = ["order", "refund", "invoice", "delivery", "account", "password", "shipping",
         "warranty", "product", "customer", "support", "billing", "subscription", "cancel",
         "upgrade", "payment", "address"]


@dataclass(frozen=True)
class Workload:
    name: str
    jobs: int
    faults: dict[int, float] = field(default_factory=dict)
    rpm: int | None = None
    tpm: int | None = None
    window_s: float = 60.0
    max_tokens: int = 16
    prompt_words: int = 8


WORKLOADS = [
    Workload("faults2", 1000, {503: 0.02}),
    Workload("faults10", 300, {429: 0.05, 503: 0.05}),
    Workload("faults30", 300, {429: 0.10, 503: 0.10, 500: 0.10}),
    # rpm 600 / tpm 60k per minute, scaled to a 10 s window; ~170 tokens a request.
    Workload("ratelimited", 170, rpm=100, tpm=10_000, window_s=10.0, max_tokens=150,
             prompt_words=12),
    Workload("steady", 480, rpm=100, tpm=10_000, window_s=10.0, max_tokens=150,
             prompt_words=12),
]


def messages(i: int, w: Workload) -> list[dict[str, str]]:
    words = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(w.prompt_words))
    return [{"role": "user", "content": f"[{i}] Reply briefly about: {words}."}]


def bound_s(w: Workload, latency_s: float) -> float | None:
    """The makespan of a perfect client: each request admitted, in order, at the first
    moment the simulator's own strict sliding-window limiter admits it."""
    if not (w.rpm or w.tpm):
        return None
    now = [0.0]
    lim = RateLimiter(window_s=w.window_s, clock=lambda: now[0])
    limits = [Limit("*", w.rpm, w.tpm)]
    for i in range(w.jobs):
        cost = count_messages(messages(i, w)) + w.max_tokens
        while not (d := lim.acquire(limits, cost)).allowed:
            now[0] += d.retry_after_s
    return now[0] + latency_s


def sim_config(w: Workload) -> SimConfig:
    model = SimModel(error_rates=dict(w.faults), retry_after_s=0.7, latency_ms=50,
                     latency_jitter_ms=20)
    return SimConfig(models={"only": model}, default=model, seed=5, rpm=w.rpm, tpm=w.tpm,
                     window_s=w.window_s)


def write_jobs(path: Path, w: Workload) -> None:
    with path.open("w") as f:
        for i in range(w.jobs):
            f.write(json.dumps({"custom_id": f"p{i}", "body": {
                "model": "only", "messages": messages(i, w), "max_tokens": w.max_tokens}}) + "\n")


# --safety: providers.<p>.rate_safety_s, a cap on the admission-to-arrival delay a call
# counts with (None: the pools' default cap of 2 s; 50 ms calls count until their reply).
SAFETY_S: float | None = None


def br_config(url: str, w: Workload) -> dict[str, Any]:
    provider: dict[str, Any] = {"base_url": f"{url}/v1", "timeout_s": 10, "max_retries": 2}
    if w.rpm or w.tpm:
        provider |= {"rpm": w.rpm, "tpm": w.tpm, "rate_window_s": w.window_s}
        if SAFETY_S is not None:
            provider["rate_safety_s"] = SAFETY_S
    return {"providers": {"p": provider},
            "models": {"only": {"provider": "p", "tier": 1,
                                "price": {"input_per_mtok": 1, "output_per_mtok": 2}}},
            "tasks": {"default": {"ladder": [1], "validators": []}}}


def toml(d: dict[str, Any]) -> str:
    out = []
    for section, table in d.items():
        for name, values in table.items():
            out.append(f"[{section}.{name}]")
            for k, v in values.items():
                out.append(f"{k} = {_value(v)}")
    return "\n".join(out) + "\n"


def _value(v: Any) -> str:
    """A TOML value: JSON's scalars and arrays are TOML too, its objects are not."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def run_batchroute(url: str, w: Workload, tmp: Path) -> dict[str, Any]:
    from batchroute.config import parse_config
    from batchroute.embedded import run_file
    from batchroute.store import Store, get_engine

    src = tmp / f"{w.name}.jsonl"
    write_jobs(src, w)
    store = Store(get_engine(f"sqlite:///{tmp}/{w.name}-{time.monotonic_ns()}.db"))
    started = time.perf_counter()
    outcome = run_file(src, tmp / "out.jsonl", tmp / "err.jsonl",
                       parse_config(br_config(url, w), "peers"), store=store,
                       concurrency=IN_FLIGHT)
    return {"wall_s": time.perf_counter() - started, "ok": outcome.report["succeeded"]}


def run_celery_app(url: str, w: Workload, tmp: Path) -> dict[str, Any]:
    """The same 2 workers, the batch handed over by an application that is already running
    (``ingest_file`` with a ``CeleryDispatcher`` in this process), as the SDK loop and
    LiteLLM run warm in this process: no interpreter start and imports inside the clock."""
    return run_celery(url, w, tmp, in_process=True)


def run_celery(url: str, w: Workload, tmp: Path, in_process: bool = False) -> dict[str, Any]:
    import subprocess
    from unittest import mock

    import redis

    from batchroute.store import FINISHED, Store, get_engine

    broker = f"redis://127.0.0.1:6379/{os.environ.get('PEERS_REDIS_DB', '12')}"
    redis.Redis.from_url(broker).flushdb()
    cfg = tmp / f"{w.name}.toml"
    cfg.write_text(toml({k: v for k, v in br_config(url, w).items() if k != "tasks"})
                   + '[tasks.default]\nladder = [1]\nvalidators = []\n')
    db = f"sqlite:///{tmp}/{w.name}-celery.db"
    env = {**os.environ, "BATCHROUTE_CONFIG": str(cfg), "BATCHROUTE_BROKER_URL": broker,
           "BATCHROUTE_DATABASE_URL": db, "BATCHROUTE_LOG_LEVEL": "ERROR"}
    workers = [subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers", "worker", "--pool", "threads", "-c",
         str(IN_FLIGHT // 2), "--without-gossip", "--without-mingle", "-l", "ERROR",
         "-n", f"peers{i}.{time.monotonic_ns()}@%h"], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    try:
        time.sleep(3)  # both workers up before the clock starts
        src = tmp / f"{w.name}.jsonl"
        write_jobs(src, w)
        store = Store(get_engine(db))
        if in_process:
            from batchroute.config import load_config
            from batchroute.dispatch import CeleryDispatcher
            from batchroute.ingest import ingest_file

            # The app's broker and database, as a deployed application's environment sets them.
            with mock.patch.dict(os.environ, env):
                config, dispatcher = load_config(cfg), CeleryDispatcher()
            started = time.perf_counter()
            batch_id = ingest_file(config, store, dispatcher, src).batch_id
            submit_s = time.perf_counter() - started
        else:
            started = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "batchroute.cli", "submit", str(src),
                                  "--json"], env=env, capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"submit failed: {res.stderr[-2000:]}{res.stdout[-2000:]}")
            submit_s = time.perf_counter() - started  # a CLI process: imports, ingest
            batch_id = json.loads(res.stdout[res.stdout.index("{"):])["batch_id"]
        while True:
            counts = store.state_counts(batch_id)
            if sum(counts.get(s, 0) for s in FINISHED) >= w.jobs:
                break
            time.sleep(0.1)
        return {"wall_s": time.perf_counter() - started, "ok": counts.get("succeeded", 0),
                "submit_s": submit_s}
    finally:
        for p in workers:
            p.terminate()
        for p in workers:
            p.wait(15)


async def _loop(w: Workload, call: Callable[[int], Any]) -> dict[str, Any]:
    sem = asyncio.Semaphore(IN_FLIGHT)

    async def one(i: int) -> bool:
        async with sem:
            try:
                await call(i)
                return True
            except Exception:
                return False

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(w.jobs)))
    return {"wall_s": time.perf_counter() - started, "ok": sum(results)}


def run_sdk(url: str, w: Workload, tmp: Path) -> dict[str, Any]:
    import openai

    async def go() -> dict[str, Any]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=2,
                                    timeout=10)
        try:
            return await _loop(w, lambda i: client.chat.completions.create(
                model="only", messages=messages(i, w),  # type: ignore[arg-type]
                max_tokens=w.max_tokens))
        finally:
            await client.close()

    return asyncio.run(go())


def run_litellm(url: str, w: Workload, tmp: Path) -> dict[str, Any]:
    import litellm

    litellm.suppress_debug_info = True
    router = litellm.Router(model_list=[{"model_name": "only", "litellm_params": {
        "model": "openai/only", "api_base": f"{url}/v1", "api_key": "x", "timeout": 10}}],
        num_retries=2)

    async def go() -> dict[str, Any]:
        return await _loop(w, lambda i: router.acompletion(
            model="only", messages=messages(i, w),  # type: ignore[arg-type]
            max_tokens=w.max_tokens))

    return asyncio.run(go())


SYSTEMS: dict[str, Callable[[str, Workload, Path], dict[str, Any]]] = {
    "batchroute": run_batchroute, "celery2": run_celery, "celery2-app": run_celery_app,
    "litellm": run_litellm, "sdk": run_sdk}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated workloads (default: all)")
    ap.add_argument("--systems", default="batchroute,litellm,sdk")
    ap.add_argument("--celery", action="store_true", help="also 2 Celery workers")
    ap.add_argument("--safety", type=float, default=None,
                    help="batchroute's rate_safety_s (default: the pools' 2 s cap)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    global SAFETY_S
    SAFETY_S = a.safety
    from batchroute.logs import configure_logging

    configure_logging(level="ERROR")
    import logging

    logging.getLogger("LiteLLM").setLevel(logging.CRITICAL)
    systems = a.systems.split(",") + (["celery2", "celery2-app"] if a.celery else [])
    chosen = [w for w in WORKLOADS if not a.only or w.name in a.only.split(",")]
    rows: list[dict[str, Any]] = []
    for turn, w in enumerate(chosen):
        order = systems[turn % len(systems):] + systems[:turn % len(systems)]
        for name in order:
            with SimServer(sim_config(w)) as sim, tempfile.TemporaryDirectory() as tmp:
                out = SYSTEMS[name](sim.url, w, Path(tmp))
                stats = sim.stats()
            row = {"workload": w.name, "system": name, "jobs": w.jobs, "ok": out["ok"],
                   "wall_s": round(out["wall_s"], 2), "calls": stats["requests"],
                   "http_429": stats["by_status"].get("429", 0),
                   "refused_by_limits": stats["refused_rpm"] + stats["refused_tpm"]}
            if "submit_s" in out:
                row["submit_s"] = round(out["submit_s"], 2)
            b = bound_s(w, 0.05)
            if b is not None:
                row["bound_s"] = round(b, 2)
                row["vs_bound"] = round(out["wall_s"] / b, 3)
            rows.append(row)
            if not a.json:
                print(json.dumps(row), flush=True)
    for w in chosen:  # ratios against the SDK loop
        sdk = next((r for r in rows if r["workload"] == w.name and r["system"] == "sdk"), None)
        for r in rows:
            if sdk and r["workload"] == w.name:
                r["vs_sdk"] = round(r["wall_s"] / sdk["wall_s"], 2)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cores",
            "python": platform.python_version(), "rate_safety_s": SAFETY_S,
            "load_avg": os.getloadavg()}
    if a.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
    else:
        print(f"\n{'workload':12} {'system':11} {'ok':>9} {'wall_s':>7} {'vs_sdk':>6} "
              f"{'calls':>6} {'429s':>5} {'bound_s':>7} {'vs_bound':>8}")
        for r in rows:
            print(f"{r['workload']:12} {r['system']:11} {r['ok']:>4}/{r['jobs']:<4} "
                  f"{r['wall_s']:>7} {r.get('vs_sdk', ''):>6} {r['calls']:>6} "
                  f"{r['http_429']:>5} {r.get('bound_s', ''):>7} {r.get('vs_bound', ''):>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
