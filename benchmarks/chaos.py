"""Chaos run: a 1,000-job batch while the cheap provider misbehaves.

The cheap tier has two equivalent models on two providers. `cheap-a` answers
20% of calls with a 5xx, 10% with a 429 and hangs past the client timeout on
5%; `cheap-b` is healthy. The run must end with every job succeeded or failed
with a reason, a bounded number of provider calls, and a report of what retries,
failover and the circuit breaker did.

    python benchmarks/chaos.py [--jobs 1000] [--concurrency 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from batchroute.config import parse_config
from batchroute.embedded import run_file
from batchroute.logs import configure_logging
from batchroute.policy import MAX_ATTEMPTS_PER_JOB
from batchroute.store import Store, get_engine

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "jobs" / "examples" / "support_batch.jsonl"


def chaos_config(timeout_s: float) -> dict[str, Any]:
    cheap_price = {"input_per_mtok": 0.15, "output_per_mtok": 0.60}
    return {
        "providers": {
            "cheap-a": {"base_url": "sim://", "timeout_s": timeout_s, "max_retries": 2},
            "cheap-b": {"base_url": "sim://", "timeout_s": timeout_s, "max_retries": 2},
            "premium": {"base_url": "sim://", "timeout_s": timeout_s},
        },
        "models": {
            "cheap-a": {"provider": "cheap-a", "tier": 1, "price": cheap_price},
            "cheap-b": {"provider": "cheap-b", "tier": 1, "price": cheap_price},
            "mid": {"provider": "premium", "tier": 2, "price_ref": "gpt-4.1-mini",
                    "price_provider": "openai"},
            "large": {"provider": "premium", "tier": 3, "price_ref": "gpt-4o",
                      "price_provider": "openai"},
        },
        "tasks": {name: {"ladder": [1, 2, 3],
                         "validators": [{"type": "non_empty"}, {"type": "finish_reason"}]}
                  for name in ("default", "classify", "extract", "summarize", "code")},
        "breaker": {"failures": 5, "window_s": 10, "cooldown_s": 2},
        "simulator": {
            "seed": 11,
            "models": {
                "cheap-a": {"fail_rate": 0.3, "latency_ms": 20, "latency_jitter_ms": 10,
                            "error_rates": {"500": 0.1, "503": 0.1, "429": 0.1},
                            "retry_after_s": 0.5, "timeout_rate": 0.05,
                            "hang_s": timeout_s + 1},
                "cheap-b": {"fail_rate": 0.3, "latency_ms": 20, "latency_jitter_ms": 10},
                "mid": {"fail_rate": 0.1, "latency_ms": 30},
                "large": {"fail_rate": 0.02, "latency_ms": 40},
            },
        },
    }


def make_batch(n: int, path: Path) -> None:
    lines = [json.loads(x) for x in EXAMPLE.read_text().splitlines() if x.strip()]
    with path.open("w") as f:
        for i in range(n):
            obj = dict(lines[i % len(lines)])
            obj["custom_id"] = f"chaos-{i:05d}"
            if i >= len(lines):  # new prompt text so answers (and faults) differ per job
                body = json.loads(json.dumps(obj["body"]))
                body["messages"][-1]["content"] = f"[{i}] " + str(body["messages"][-1]["content"])
                obj["body"] = body
            f.write(json.dumps(obj) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=1.0, help="client timeout (s)")
    ap.add_argument("--no-equivalent", action="store_true",
                    help="drop the healthy cheap-b: retries and escalation only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    configure_logging(level="ERROR")
    data = chaos_config(args.timeout)
    if args.no_equivalent:
        del data["models"]["cheap-b"], data["providers"]["cheap-b"]
    config = parse_config(data, "chaos")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "chaos.jsonl"
        make_batch(args.jobs, src)
        store = Store(get_engine(f"sqlite:///{tmp}/chaos.db"))
        started = time.perf_counter()
        outcome = run_file(src, Path(tmp) / "out.jsonl", Path(tmp) / "err.jsonl", config,
                           store=store, concurrency=args.concurrency)
        wall = time.perf_counter() - started
        report = outcome.report
        attempts = store.attempts(report["batch_id"])
        per_job = Counter(a.job_id for a in attempts)
        jobs = list(store.iter_jobs(report["batch_id"]))
        failed_reasons = Counter((j.error or {}).get("code", "?") for j in jobs
                                 if j.state == "failed")
        unexplained = [j.custom_id for j in jobs if j.state not in ("succeeded", "failed")
                       or (j.state == "failed" and not (j.error or {}).get("message"))]
        calls_by_model = Counter(a.model for a in attempts)
        errors_by_model = Counter(a.model for a in attempts if a.outcome == "error")
    result = {
        "jobs": report["jobs"], "succeeded": report["succeeded"], "failed": report["failed"],
        "failed_reasons": dict(failed_reasons), "unfinished_or_unexplained": len(unexplained),
        "provider_calls": len(attempts), "calls_per_job": round(len(attempts) / args.jobs, 3),
        "max_calls_one_job": max(per_job.values()), "call_limit_per_job": MAX_ATTEMPTS_PER_JOB,
        "calls_by_model": dict(calls_by_model), "errors_by_model": dict(errors_by_model),
        "resilience": report["resilience"], "breakers": outcome.breakers,
        "cost_usd": report["cost_usd"], "baseline_cost_usd": report["baseline_cost_usd"],
        "savings_pct": report["savings_pct"], "wall_s": round(wall, 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:28} {v}")
    ok = (not unexplained and result["max_calls_one_job"] <= MAX_ATTEMPTS_PER_JOB)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
