"""Answer reuse (#18): the example batch run twice, 10% of its lines edited in between.

A team reruns a batch after a small edit. Run 1 pays for every line; run 2 (another
file, so another batch, same SQLite store) should pay only for the edited lines and
answer the rest from the store at $0. An edit changes a line's user message (a sentence
appended), so its reuse key changes; the lines to edit are a seeded random sample.

The example lines name no temperature (OpenAI's default is 1, not deterministic), so
they are reused only with `--reuse` (variant "as-is, --reuse"). Variant "temperature 0"
sets `temperature: 0` on every line and runs with the default mode (no flag). Both run
through the embedded runner (what `batchroute run` does) on a fresh database per seed:

    python benchmarks/reuse_rerun.py [--seeds 0 1 2 3 4] [--edit-share 0.1] [--json]

The same by hand, with the CLI:

    export BATCHROUTE_DATABASE_URL=sqlite:///reuse.db
    batchroute run jobs/examples/support_batch.jsonl -o out1.jsonl --reuse
    batchroute run edited.jsonl -o out2.jsonl --reuse      # 10% of the lines edited

Prints per variant and seed: run 1 and run 2 cost, reuse hits, run 2 cost as a share of
run 1 (goal: at most 12%), and the report's saving split of run 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from batchroute.config import load_config
from batchroute.embedded import run_file
from batchroute.logs import configure_logging
from batchroute.store import Store, get_engine

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "jobs" / "examples" / "support_batch.jsonl"
EDIT = "\n\nP.S. I have attached a screenshot, in case it helps."


def variant_lines(temperature_zero: bool) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in EXAMPLE.read_text().splitlines() if x.strip()]
    if temperature_zero:
        for line in lines:
            line["body"]["temperature"] = 0
    return lines


def edited(lines: list[dict[str, Any]], share: float, seed: int) -> tuple[list[dict], int]:
    """A copy with `share` of the lines' last user message changed (a seeded sample)."""
    out = json.loads(json.dumps(lines))
    picked = random.Random(seed).sample(range(len(out)), round(share * len(out)))
    for i in picked:
        user = [m for m in out[i]["body"]["messages"] if m["role"] == "user"][-1]
        user["content"] += EDIT
    return out, len(picked)


def write(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def one(folder: Path, temperature_zero: bool, share: float, seed: int) -> dict[str, Any]:
    config = load_config()
    store = Store(get_engine(f"sqlite:///{folder / 'reuse.db'}"))
    mode = None if temperature_zero else "on"
    base = variant_lines(temperature_zero)
    changed, n_edited = edited(base, share, seed)
    first, second = write(folder / "first.jsonl", base), write(folder / "edited.jsonl", changed)
    t0 = time.monotonic()
    r1 = run_file(first, folder / "out1.jsonl", config=config, store=store,
                  reuse_mode=mode).report
    t1 = time.monotonic()
    r2 = run_file(second, folder / "out2.jsonl", config=config, store=store,
                  reuse_mode=mode).report
    t2 = time.monotonic()
    return {"variant": "temperature 0" if temperature_zero else "as-is, --reuse",
            "seed": seed, "jobs": r1["jobs"], "edited": n_edited,
            "run1": {"cost_usd": r1["cost_usd"], "succeeded": r1["succeeded"],
                     "reuse": r1["reuse"], "wall_s": round(t1 - t0, 2)},
            "run2": {"cost_usd": r2["cost_usd"], "succeeded": r2["succeeded"],
                     "reuse": r2["reuse"], "savings_by_source": r2["savings_by_source"],
                     "wall_s": round(t2 - t1, 2)},
            "share": round(r2["cost_usd"] / r1["cost_usd"], 4) if r1["cost_usd"] else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--edit-share", type=float, default=0.1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    configure_logging(level="ERROR")
    rows = []
    for temperature_zero in (False, True):
        for seed in args.seeds:
            with tempfile.TemporaryDirectory(prefix="reuse-bench-") as tmp:
                rows.append(one(Path(tmp), temperature_zero, args.edit_share, seed))
    if args.json:
        print(json.dumps({"python": platform.python_version(), "rows": rows}, indent=2))
        return 0
    print(f"{'variant':<16} seed  edited  run1 $    run2 $    hits  run2/run1  "
          "split run2 (routing / batch / reuse)")
    for r in rows:
        s = r["run2"]["savings_by_source"]
        print(f"{r['variant']:<16} {r['seed']:>4}  {r['edited']:>6}  "
              f"{r['run1']['cost_usd']:.5f}  {r['run2']['cost_usd']:.5f}  "
              f"{r['run2']['reuse']['hits']:>4}  {100 * r['share']:>8.1f}%  "
              f"${s['routing_usd']:.4f} / ${s['batch_discount_usd']:.4f} / "
              f"${s['reuse_usd']:.4f}")
    worst = max(r["share"] for r in rows)
    print(f"worst run2/run1: {100 * worst:.1f}% (goal <= 12%)")
    return 0 if worst <= 0.12 else 1


if __name__ == "__main__":
    sys.exit(main())
