"""Does calibration hold on data it has never seen? Every evaldata dataset, seeded splits.

    python benchmarks/calibration_eval.py [--seeds 7,8,9] [--scorer] [--only NAME,...]
        [--target best-accuracy] [--jobs 2] [--json OUT.json]

For each dataset of ../shared/evaldata (``benchmarks/convert_evaldata.py`` reads them in
place) and each seed: split 50/50, ``batchroute.calibrate`` on the training half only
(5-fold cross-validation inside it, the reference model on top), then the policy and the
reference model alone are replayed on the test half (``calibrate.evaluate``: the
pipeline's own checks and pricing; benchmarks/replay.py shows the pipeline agrees with
it). Printed per split: test accuracy of the policy and of the reference, their
difference in points, the saving against the reference, the out-of-fold estimate the
policy header promised, and the untrained agreement rule (two cheap models agree, else
the reference) beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from batchroute import calibrate as cal
from batchroute.config import parse_config
from batchroute.logs import configure_logging
from batchroute.replay import Record

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convert_evaldata  # noqa: E402  (a sibling script, not a package)

TOLERANCE_POINTS = 0.3  # the bar: never more than 0.3 points below the reference


def agreement_cheap(train: list[Record], models: list[str], reference: str,
                    config: Any) -> list[str]:
    """The agreement rule's two cheap models: the two most accurate on the training
    half among those cheaper than the reference (none: the rule is not defined)."""
    singles = cal.single_scores(train, config)
    order = [m for m in cal.model_order(train, config) if m in singles]
    cheaper = order[: order.index(reference)] if reference in order else []
    return sorted(cheaper, key=lambda m: -singles[m].correct)[:2]


def run_split(name: str, seed: int, target: str, scorer_folds: int,
              data_dir: str | None, test_fraction: float,
              tolerance: float = cal.DEFAULT_TOLERANCE,
              confidence: float = cal.DEFAULT_CONFIDENCE, fresh: int = 0,
              world: int | None = None, rung_z: str = "default") -> dict[str, Any]:
    configure_logging("WARNING")
    if rung_z != "default":  # this process only (a pool worker): the per-rung check's z
        cal.types.RUNG_Z = None if rung_z == "none" else float(rung_z)
    dataset = convert_evaldata.load(name, convert_evaldata.data_dir(data_dir), fresh, world)
    train, test = convert_evaldata.split(dataset.records, seed, test_fraction)
    config = parse_config(convert_evaldata.routing_config(dataset))
    started = time.perf_counter()
    calibration = cal.calibrate(train, config, cal.Target.parse(target, tolerance=tolerance,
                                                                confidence=confidence),
                                cv_folds=5,
                                seed=seed, scorer_folds=scorer_folds, source=name)
    fit_s = time.perf_counter() - started
    rows = []
    for task, c in calibration.tasks.items():
        held = [r for r in test if r.task == task]
        fit = [r for r in train if r.task == task]
        ref = c.reference
        pol = cal.evaluate(c.policy, held, config)
        base = cal.evaluate(cal.Policy(task, (cal.Rung(ref),)), held, config)
        row: dict[str, Any] = {
            "dataset": name, "seed": seed, "world": world, "task": task, "target": target,
            "confidence": confidence, "tolerance": tolerance,
            "scorer": bool(scorer_folds), "train": len(fit), "test": len(held),
            "reference": ref, "policy": c.policy.describe(),
            "accuracy": round(pol.accuracy, 6), "reference_accuracy": round(base.accuracy, 6),
            "difference_points": round(100 * (pol.accuracy - base.accuracy), 3),
            "saving_pct": round(100 * (1 - pol.cost_usd / base.cost_usd), 2)
            if base.cost_usd else 0.0,
            "fit_seconds": round(fit_s, 1),
        }
        many = [r for r in dataset.fresh if r.task == task]
        if many:  # a simulated world: the expected figures, free of the split's noise
            pol_f = cal.evaluate(c.policy, many, config)
            base_f = cal.evaluate(cal.Policy(task, (cal.Rung(ref),)), many, config)
            row["expected"] = {
                "queries": len(many),
                "difference_points": round(100 * (pol_f.accuracy - base_f.accuracy), 3),
                "saving_pct": round(100 * (1 - pol_f.cost_usd / base_f.cost_usd), 2)}
        if c.cv is not None:
            diff, low = c.cv.paired.get(c.cv.chosen.label(), (0.0, 0.0))
            kept = c.cv.kept
            row["out_of_fold"] = {
                "difference_points": round(100 * diff, 3),
                "lower_bound_points": round(100 * low, 3),
                "saving_pct": round(100 * (1 - kept.cost_usd / c.cv.baseline.cost_usd), 2)
                if c.cv.baseline.cost_usd else 0.0}
        cheap = agreement_cheap(fit, [], ref, config)
        if len(cheap) == 2:
            agree = cal.evaluate(cal.agreement_rule(task, cheap, ref), held, config)
            row["agreement_rule"] = {
                "models": cheap, "accuracy": round(agree.accuracy, 6),
                "difference_points": round(100 * (agree.accuracy - base.accuracy), 3),
                "saving_pct": round(100 * (1 - agree.cost_usd / base.cost_usd), 2)
                if base.cost_usd else 0.0}
        rows.append(row)
        print(_line(row), file=sys.stderr, flush=True)
    return {"rows": rows}


def _line(r: dict[str, Any]) -> str:
    exp = r.get("expected")
    exp_s = (f" [expected on {exp['queries']:,} fresh queries: "
             f"{exp['difference_points']:+.2f} points, {exp['saving_pct']:.1f}%]" if exp else "")
    world = f" world={r['world']}" if r.get("world") is not None else ""
    return (f"{r['dataset']}{world} seed={r['seed']}: accuracy {r['accuracy']:.4f} vs "
            f"{r['reference']} {r['reference_accuracy']:.4f} "
            f"({r['difference_points']:+.2f} points), saving {r['saving_pct']:.1f}%, "
            f"fit {r['fit_seconds']:.0f} s;{exp_s} {r['policy']}")


def markdown(rows: list[dict[str, Any]]) -> str:
    expected = any("expected" in r for r in rows)
    out = ("| dataset | split | test n | reference (test acc.) | policy test acc. | "
           "difference (points) | saving | out of fold: diff. (lower bound), saving | "
           + ("expected on fresh queries: diff., saving | " if expected else "")
           + "agreement rule: diff., saving | fit s | policy |\n"
           + "|---" * (12 if expected else 11) + "|\n")
    for r in rows:
        oof = r.get("out_of_fold")
        oof_s = (f"{oof['difference_points']:+.2f} ({oof['lower_bound_points']:+.2f}), "
                 f"{oof['saving_pct']:.1f}%" if oof else "-")
        ag = r.get("agreement_rule")
        ag_s = f"{ag['difference_points']:+.2f}, {ag['saving_pct']:.1f}%" if ag else "-"
        ex = r.get("expected")
        ex_s = (f"{ex['difference_points']:+.2f}, {ex['saving_pct']:.1f}% | " if ex
                else "- | " if expected else "")
        split = (f"{r['world']}/{r['seed']}" if r.get("world") is not None
                 else str(r["seed"]))
        out += (f"| {r['dataset']} | {split} | {r['test']} | {r['reference']} "
                f"({r['reference_accuracy']:.4f}) | {r['accuracy']:.4f} "
                f"| {r['difference_points']:+.2f} | {r['saving_pct']:.1f}% | {oof_s} | {ex_s}"
                f"{ag_s} | {r['fit_seconds']:.0f} | {r['policy']} |\n")
    return out


def summary(rows: list[dict[str, Any]]) -> str:
    worst = min(r["difference_points"] for r in rows)
    held = sum(r["difference_points"] >= -TOLERANCE_POINTS for r in rows)
    goal = sum(_goal(r) for r in rows)
    out = (f"{len(rows)} splits: within {TOLERANCE_POINTS} points of the reference on "
           f"{held}; worst {worst:+.2f} points; goal (accuracy >= reference at >= 75% "
           f"saving) on {goal}.")
    exp = [r["expected"] for r in rows if "expected" in r]
    if exp:
        diffs = [e["difference_points"] for e in exp]
        out += (f" Expected (fresh queries of the simulated world), {len(exp)} policies: "
                f"difference {min(diffs):+.2f} to {max(diffs):+.2f} points (mean "
                f"{sum(diffs) / len(diffs):+.2f}), saving {min(e['saving_pct'] for e in exp):.1f}"
                f"-{max(e['saving_pct'] for e in exp):.1f}%; goal in expectation on "
                f"{sum(e['difference_points'] >= 0 and e['saving_pct'] >= 75 for e in exp)}.")
    worlds = sorted({r["world"] for r in rows if r.get("world") is not None})
    if len(worlds) > 1:
        per = {w: [r for r in rows if r.get("world") == w] for w in worlds}
        out += " Goal on the test halves, per world: " + ", ".join(
            f"{w}: {sum(_goal(r) for r in per[w])}/{len(per[w])}" for w in worlds) + "."
    return out


def _goal(r: dict[str, Any]) -> bool:
    """The issue's goal on one split's test half."""
    return bool(r["difference_points"] >= 0 and r["saving_pct"] >= 75)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="7,8,9")
    ap.add_argument("--only", default="", help="comma-separated dataset names")
    ap.add_argument("--target", default="best-accuracy")
    ap.add_argument("--scorer", action="store_true", help="learned scorers (scikit-learn)")
    ap.add_argument("--jobs", type=int, default=2, help="splits calibrated in parallel")
    ap.add_argument("--data-dir")
    ap.add_argument("--test-fraction", type=float,
                    default=convert_evaldata.DEFAULT_TEST_FRACTION)
    ap.add_argument("--tolerance", type=float, default=cal.DEFAULT_TOLERANCE)
    ap.add_argument("--confidence", type=float, default=cal.DEFAULT_CONFIDENCE)
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--worlds", default="",
                    help="simulated datasets: comma-separated world seeds, each a new draw "
                         "of the models' leanings, queries and answers (default: the one "
                         "world of the tables, 16)")
    ap.add_argument("--rung-z", default="default", metavar="Z",
                    help="the per-rung check's z (calibrate.types.RUNG_Z), or 'none' "
                         "for none: the baseline it is measured against")
    ap.add_argument("--fresh", type=int, default=0, metavar="N",
                    help="simulated datasets: also score each policy on N fresh queries "
                         "of the same world (its expected difference; e.g. 40000)")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(convert_evaldata.DATASETS)
    seeds = [int(s) for s in args.seeds.split(",")]
    worlds: list[int | None] = [int(w) for w in args.worlds.split(",") if w] or [None]
    jobs = [(n, s, w if n in convert_evaldata.SIMULATED else None) for n in names
            for w in (worlds if n in convert_evaldata.SIMULATED else [None]) for s in seeds]
    scorer_folds = cal.DEFAULT_SCORER_FOLDS if args.scorer else 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_split, n, s, args.target, scorer_folds, args.data_dir,
                               args.test_fraction, args.tolerance, args.confidence,
                               args.fresh, w, args.rung_z)
                   for n, s, w in jobs]
        rows = [row for f in futures for row in f.result()["rows"]]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), "utf-8")
    print(markdown(rows))
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
