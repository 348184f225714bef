"""Adaptive cascade vs the fixed ladder: same jobs, same simulated models, cost and accepted.

The cheap tier (sim-small, priced as gpt-4o-mini) nearly always fails one task and nearly
always passes another: its JSON extractions fail the schema check 95% of the time, its
ticket classifications fail the label check 2% of the time (the simulator's per-kind
`fail_rates`). The fixed ladder tries tier 1 first for every job; the adaptive cascade
learns from the attempt ledger that extractions are cheaper started at tier 2.

The jobs (the example batch's extraction and classification prompts, varied so every job
gets its own answers) run as consecutive batches, like a day of submissions, through the
embedded runner (the pipeline the Celery workers run), once per mode on a fresh database:

    python benchmarks/cascade_bench.py [--jobs 2000] [--batches 4] [--concurrency 16] [--json]

Prints per mode: accepted outputs, attempts, tier-1 attempts per task, cost, cost per
accepted output, and the adaptive/fixed cost ratio (goal: < 1 at the same accepted count).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from batchroute.config import parse_config
from batchroute.embedded import run_file
from batchroute.logs import configure_logging
from batchroute.store import SUCCEEDED, Store, get_engine

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "jobs" / "examples" / "support_batch.jsonl"


def bench_config(adaptive: bool) -> dict[str, Any]:
    models = {"sim-small": ("gpt-4o-mini", 1), "sim-medium": ("gpt-4.1-mini", 2),
              "sim-large": ("gpt-4o", 3)}
    checks = [{"type": "non_empty"}, {"type": "finish_reason"}]
    return {
        "providers": {"sim": {"base_url": "sim://", "timeout_s": 30}},
        "models": {name: {"provider": "sim", "tier": tier, "price_ref": ref,
                          "price_provider": "openai"}
                   for name, (ref, tier) in models.items()},
        "tasks": {name: {"ladder": [1, 2, 3], "validators": checks}
                  for name in ("default", "classify", "extract")},
        "cascade": {"enabled": adaptive, "min_observations": 20, "explore_rate": 0.05,
                    "window": 5000, "ttl_s": 1.0},
        "simulator": {"seed": 7, "models": {
            "sim-small": {"fail_rate": 0.3, "fail_rates": {"json": 0.95, "choices": 0.02}},
            "sim-medium": {"fail_rate": 0.08},
            "sim-large": {"fail_rate": 0.02}}},
    }


def make_batches(n: int, batches: int, folder: Path) -> list[Path]:
    """`n` jobs, half extraction (json_schema), half classification (choices), interleaved,
    split into `batches` files; every job's prompt is unique so its answers are its own."""
    lines = [json.loads(x) for x in EXAMPLE.read_text().splitlines() if x.strip()]
    pools = {task: [x for x in lines if x.get("batchroute", {}).get("task") == task]
             for task in ("extract", "classify")}
    paths = [folder / f"batch{b + 1}.jsonl" for b in range(batches)]
    files = [p.open("w") for p in paths]
    for i in range(n):
        task = ("extract", "classify")[i % 2]
        src = pools[task][(i // 2) % len(pools[task])]
        obj = json.loads(json.dumps(src))
        obj["custom_id"] = f"{task[:3]}-{i:05d}"
        obj["body"]["messages"][-1]["content"] = (f"[request {i}]\n"
                                                  + str(obj["body"]["messages"][-1]["content"]))
        files[i * batches // n].write(json.dumps(obj) + "\n")
    for f in files:
        f.close()
    return paths


def run_mode(adaptive: bool, paths: list[Path], folder: Path, concurrency: int,
             ) -> dict[str, Any]:
    config = parse_config(bench_config(adaptive))
    store = Store(get_engine(f"sqlite:///{folder / ('adaptive.db' if adaptive else 'fixed.db')}"))
    per_batch: list[dict[str, Any]] = []
    tier1: Counter[str] = Counter()
    started_above: Counter[str] = Counter()
    started = time.perf_counter()
    report: dict[str, Any] = {}
    for path in paths:
        outcome = run_file(path, folder / f"{path.stem}.{int(adaptive)}.out.jsonl", None,
                           config, store=store, concurrency=concurrency)
        report = outcome.report
        per_batch.append({"batch": path.stem, "jobs": report["jobs"],
                          "accepted": report["succeeded"], "attempts": report["attempts"],
                          "cost_usd": report["cost_usd"]})
        for a in store.attempts(report["batch_id"]):
            tier1[a.task] += a.tier == 1
        for job in store.iter_jobs(report["batch_id"]):
            started_above[job.task] += bool(job.options.get("cascade_skipped"))
    accepted = sum(b["accepted"] for b in per_batch)
    cost = sum(b["cost_usd"] for b in per_batch)
    last = report["cascade"]["tasks"]
    jobs_by_task: Counter[str] = Counter()
    accepted_by_task: Counter[str] = Counter()
    for path in paths:
        for line in path.read_text().splitlines():
            jobs_by_task[json.loads(line)["batchroute"]["task"]] += 1
    for b in per_batch:
        for job in store.iter_jobs(_batch_id(store, b["batch"])):
            accepted_by_task[job.task] += job.state == SUCCEEDED
    return {
        "mode": "adaptive" if adaptive else "fixed",
        "jobs": sum(b["jobs"] for b in per_batch), "accepted": accepted,
        "attempts": sum(b["attempts"] for b in per_batch), "cost_usd": round(cost, 6),
        "cost_per_accepted_usd": round(cost / accepted, 8) if accepted else None,
        "tier1_attempts": dict(tier1), "jobs_started_above_tier1": dict(started_above),
        "accepted_by_task": dict(accepted_by_task), "jobs_by_task": dict(jobs_by_task),
        "batches": per_batch, "wall_s": round(time.perf_counter() - started, 1),
        "final_plan": {task: {"skipped_tiers": t["skipped_tiers"],
                              "tiers": {k: v["router"] for k, v in t["tiers"].items()}}
                       for task, t in last.items()},
    }


def _batch_id(store: Store, name: str) -> str:
    batch = store.find_batch(f"{name}.jsonl")
    assert batch is not None
    return batch.id


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    configure_logging(level="ERROR")
    with tempfile.TemporaryDirectory(prefix="br-cascade-") as tmp:
        folder = Path(tmp)
        paths = make_batches(args.jobs, args.batches, folder)
        fixed = run_mode(False, paths, folder, args.concurrency)
        adaptive = run_mode(True, paths, folder, args.concurrency)
    ratio = adaptive["cost_usd"] / fixed["cost_usd"]
    result = {"machine": f"{platform.processor() or platform.machine()}, "
                         f"Python {platform.python_version()}",
              "jobs": args.jobs, "batches": args.batches, "concurrency": args.concurrency,
              "fixed": fixed, "adaptive": adaptive, "cost_ratio_adaptive_over_fixed":
              round(ratio, 4)}
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    print(f"{args.jobs} jobs in {args.batches} batches, concurrency {args.concurrency}")
    head = f"{'':34}{'fixed ladder':>16}{'adaptive':>16}"
    print(head)
    rows = [("accepted outputs", "accepted"), ("attempts", "attempts"),
            ("cost (USD)", "cost_usd"), ("cost per accepted output", "cost_per_accepted_usd"),
            ("wall time (s)", "wall_s")]
    for label, key in rows:
        print(f"{label:34}{fixed[key]!s:>16}{adaptive[key]!s:>16}")
    for task in sorted(fixed["jobs_by_task"]):
        print(f"{task + ': tier-1 attempts':34}{fixed['tier1_attempts'].get(task, 0):>16}"
              f"{adaptive['tier1_attempts'].get(task, 0):>16}")
        share = [f"{m['accepted_by_task'].get(task, 0)} / {m['jobs_by_task'][task]}"
                 for m in (fixed, adaptive)]
        print(f"{task + ': accepted / jobs':34}{share[0]:>16}{share[1]:>16}")
    print("per batch cost (USD):  fixed " + ", ".join(f"{b['cost_usd']:.4f}"
                                                       for b in fixed["batches"])
          + " | adaptive " + ", ".join(f"{b['cost_usd']:.4f}" for b in adaptive["batches"]))
    for task, plan in adaptive["final_plan"].items():
        print(f"final plan {task}: skips {plan['skipped_tiers'] or 'nothing'}")
        for tier, tp in plan["tiers"].items():
            if tp:
                print(f"  tier {tier}: {tp['reason']}")
    print(f"cost ratio adaptive / fixed: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
