"""Replay real LLM answers: cost saved at equal accuracy, calibrated on train, measured on test.

One dataset (files written by benchmarks/convert_evaldata.py, or any replay files)::

    python benchmarks/replay.py --train DIR/train.jsonl --test DIR/test.jsonl [--json]

An existing policy file (calibrated or hand-written) scored on test queries, no calibration::

    python benchmarks/replay.py --policy policy.toml --test DIR/test.jsonl [--train DIR/train.jsonl]

Every dataset of ../shared/evaldata with per-model correctness, one or more seeded
splits, both targets (README table)::

    python benchmarks/replay.py --all --out /tmp/replay [--seeds 7,8,9] [--markdown]

What a run does:

1. ``batchroute.calibrate`` fits the policy on the training file only (ladder length and
   safety margin by 5-fold cross-validation inside it) and writes a routing config;
2. the test queries become an OpenAI batch file, run through the real pipeline
   (``embedded.run_file``: ingestion, routing, HTTP calls to the simulator in replay mode
   serving the *test* file only, validators, escalation, pricing, the report);
3. each job's final answer (first choice of the output line, from the model that
   answered) is looked up among that model's recorded answers to that query, whose
   label says whether it was correct;
4. every single model is scored on the same test queries, and the offline replay of the
   policy (``calibrate.evaluate``) is checked against what the pipeline did.

The comparator for savings is the cheapest single model that reaches the best single
model's accuracy *on the test queries* (picked with hindsight, a demanding bar); the
model that looked best on the training queries is reported too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from batchroute import calibrate as cal
from batchroute.config import Config, load_config
from batchroute.consensus import answer_key
from batchroute.embedded import run_file
from batchroute.logs import configure_logging
from batchroute.replay import Record, load_records
from batchroute.store import Store, get_engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convert_evaldata  # noqa: E402  (a sibling script, not a package)

GOAL_COST_SHARE = 0.30  # at accuracy >= the best single model's, cost <= 30% of its cost
TARGETS = ("best-accuracy", "95%")


def batch_lines(records: list[Record]) -> list[dict[str, Any]]:
    return [{"custom_id": r.id, "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "auto", "messages": r.messages},
             "batchroute": {"task": r.task}} for r in records]


def judge(line: dict[str, Any], record: Record) -> tuple[bool, bool]:
    """(correct, matched): was the job's final answer right, and was it found verbatim
    among the answering model's recorded samples (it always should be in replay)."""
    body = (line.get("response") or {}).get("body") or {}
    choices = body.get("choices") or []
    if not choices:
        return False, True  # failed job: no answer
    content = (choices[0].get("message") or {}).get("content") or ""
    label = record.label_of(line["batchroute"]["model"], content)
    if label is not None:
        return label, True
    if record.reference is not None:
        return answer_key(content) == answer_key(record.reference), False
    return False, False


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text("utf-8").splitlines() if x.strip()]


def _score_dict(score: cal.Score) -> dict[str, Any]:
    return {"accuracy": round(score.accuracy, 6), "correct": score.correct,
            "cost_usd": round(score.cost_usd, 6)}


def _policy_run_config(policy_file: Path, test_path: Path, workdir: Path) -> Path:
    """A copy of ``policy_file`` whose simulator serves the test queries only, with
    its scorer files named by absolute path (they are relative to the policy file)."""
    data = tomllib.loads(policy_file.read_text("utf-8"))
    base = policy_file.resolve().parent
    for profile in (data.get("tasks") or {}).values():
        for spec in profile.get("validators") or []:
            if isinstance(spec.get("model_file"), str):
                spec["model_file"] = str((base / spec["model_file"]).resolve())
    data.setdefault("simulator", {})["replay"] = str(test_path.resolve())
    out = workdir / "policy.toml"
    out.write_text(cal.to_toml(data, f"# {policy_file} on {test_path}\n"), "utf-8")
    return out


def agreement_baseline(train: list[Record], test: list[Record], config: Config,
                       reference: str, task: str) -> dict[str, Any] | None:
    """The untrained rule "two cheap models agree, else the reference", its two cheap
    models the most accurate of those cheaper than the reference on ``train`` (on the
    test queries when no training file is given: hindsight, said so)."""
    pick_on = train or test
    singles = cal.single_scores(pick_on, config)
    order = [m for m in cal.model_order(pick_on, config) if m in singles]
    if reference not in order:
        return None
    cheap = sorted(order[: order.index(reference)], key=lambda m: -singles[m].correct)[:2]
    if len(cheap) < 2:
        return None
    score = cal.evaluate(cal.agreement_rule(task, cheap, reference), test, config)
    return {"models": cheap, "picked_on": "train" if train else "test (hindsight)",
            **_score_dict(score)}


def run_one(train_path: Path | None, test_path: Path, config_path: Path | None, workdir: Path,
            target: str | None = None, max_cost_usd: float | None = None,
            max_rungs: int = cal.DEFAULT_MAX_RUNGS, cv_folds: int = 5, seed: int = 0,
            concurrency: int = 32, scorer_folds: int = 0,
            scorer_bank: cal.ScorerBank | None = None,
            policy_file: Path | None = None) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    train = load_records(train_path) if train_path else []
    test = load_records(test_path)
    overlap = {r.key for r in train} & {r.key for r in test}
    if overlap:
        raise SystemExit(f"{len(overlap)} prompt(s) are in both {train_path} and {test_path}")

    started = time.perf_counter()
    calibration: cal.Calibration | None = None
    if policy_file is not None:  # score a policy as it is: nothing is fitted
        calibrated = _policy_run_config(policy_file, test_path, workdir)
        run_config = load_config(calibrated)
        # Single models and the agreement rule need every model's price: the dataset's
        # config when there is one (a calibrated policy keeps only its own models).
        config = load_config(config_path) if config_path else run_config
        policies = {t: cal.policy_from_config(run_config, t)
                    for t in sorted({r.task for r in test})}
    else:
        assert config_path is not None and train_path is not None
        config = load_config(config_path)
        calibration = cal.calibrate(train, config, cal.Target.parse(target, max_cost_usd),
                                    max_rungs=max_rungs, source=str(train_path),
                                    cv_folds=cv_folds, seed=seed, scorer_folds=scorer_folds,
                                    scorer_bank=scorer_bank)
        calibrated = workdir / "calibrated.toml"
        data = cal.policy_config(calibration, config, cal.load_raw_config(config),
                                 scorer_dir=cal.scorer_dir_for(calibrated), base=workdir)
        # The simulator answers the test queries only: nothing else is reachable in the run.
        data.setdefault("simulator", {})["replay"] = str(test_path.resolve())
        calibrated.write_text(cal.to_toml(data, cal.header(calibration)), "utf-8")
        run_config = load_config(calibrated)
        policies = {t: c.policy for t, c in calibration.tasks.items()}
    fit_s = time.perf_counter() - started

    batch = workdir / "batch.jsonl"
    batch.write_text("".join(json.dumps(x) + "\n" for x in batch_lines(test)), "utf-8")
    out, errors = workdir / "out.jsonl", workdir / "errors.jsonl"
    db = workdir / "run.db"
    db.unlink(missing_ok=True)
    started = time.perf_counter()
    outcome = run_file(batch, out, errors, run_config, store=Store(get_engine(f"sqlite:///{db}")),
                       concurrency=concurrency)
    run_s = time.perf_counter() - started

    by_id = {r.id: r for r in test}
    correct = unmatched = 0
    for line in _read_jsonl(out) + _read_jsonl(errors):
        record = by_id.get(line.get("custom_id") or "")
        if record is None or line.get("batchroute") is None:
            continue
        ok, matched = judge(line, record)
        correct += ok
        unmatched += not matched
    n = len(test)
    cost = float(outcome.report["cost_usd"])

    offline = [cal.evaluate(p, [r for r in test if r.task == t], config)
               for t, p in policies.items()]
    offline_correct = sum(s.correct for s in offline)
    offline_cost = sum(s.cost_usd for s in offline)
    singles = cal.single_scores(test, config)
    best_acc = max(s.correct for s in singles.values())
    reaching = [m for m, s in singles.items() if s.correct >= best_acc]
    comparator = min(reaching, key=lambda m: singles[m].cost_usd)
    ref = singles[comparator]
    train_pick = ({t: c.best_single for t, c in calibration.tasks.items()}
                  if calibration else {})
    picked = [m for m in set(train_pick.values()) if m in singles]
    references = {t: p.rungs[-1].model for t, p in policies.items()}
    ref_cost = sum(singles[m].cost_usd for m in set(references.values()) if m in singles)
    ref_correct = sum(singles[m].correct for m in set(references.values()) if m in singles)
    result = {
        "train": str(train_path), "test": str(test_path),
        "config": str(policy_file or config_path),
        "target": calibration.target.describe() if calibration else "(policy file)",
        "queries": {"train": len(train), "test": n},
        "scorer_folds": scorer_folds,
        "policy": {t: p.describe() for t, p in policies.items()},
        "calibration": calibration.to_dict() if calibration else None,
        "reference": {"models": references, "correct": ref_correct,
                      "cost_usd": round(ref_cost, 6),
                      "accuracy_delta_points": round(100 * (correct - ref_correct) / n, 3)
                      if n else 0.0,
                      "savings_pct": round(100 * (1 - cost / ref_cost), 2) if ref_cost else None},
        "agreement_rule": {t: agreement_baseline([r for r in train if r.task == t],
                                                 [r for r in test if r.task == t], config,
                                                 ref, t)
                           for t, ref in references.items()},
        "calibrated_config": str(calibrated),
        "pipeline": {"accuracy": round(correct / n, 6) if n else 0.0, "correct": correct,
                     "cost_usd": round(cost, 6), "jobs": outcome.report["jobs"],
                     "succeeded": outcome.report["succeeded"],
                     "failed": outcome.report["failed"], "attempts": outcome.report["attempts"],
                     "escalation_rate": outcome.report["escalation_rate"],
                     "by_model": {m: {"jobs": b["jobs"], "attempts": b["attempts"],
                                      "cost_usd": round(b["cost_usd"], 6)}
                                  for m, b in outcome.report["by_model"].items()},
                     "answers_not_found_in_record": unmatched},
        "offline_replay_agrees": (offline_correct == correct
                                  and abs(offline_cost - cost) <= 1e-6 * max(1.0, cost)),
        "singles": {m: _score_dict(s) for m, s in singles.items()},
        "best_single_test": {"model": comparator, **_score_dict(ref)},
        "best_single_picked_on_train": {m: _score_dict(singles[m]) for m in picked},
        "cost_share_of_best": round(cost / ref.cost_usd, 6) if ref.cost_usd else None,
        "savings_pct": round(100 * (1 - cost / ref.cost_usd), 2) if ref.cost_usd else None,
        "accuracy_delta": round((correct - ref.correct) / n, 6) if n else 0.0,
        "target_met_on_test": (_target_met(calibration.target, correct, cost, n, ref)
                               if calibration else None),
        "goal_met": bool(correct >= ref.correct and cost <= GOAL_COST_SHARE * ref.cost_usd),
        "seconds": {"calibrate": round(fit_s, 2), "run": round(run_s, 2)},
    }
    return result


def _target_met(target: cal.Target, correct: int, cost: float, n: int,
                best: cal.Score) -> bool:
    """The calibration target, judged on the test queries against the best single model
    on those queries (no margin: the margin is a training-side safety)."""
    if target.kind == "cost":
        return cost <= target.value * n + 1e-12
    if target.kind == "best":
        return correct >= best.correct
    if target.kind == "relative":
        return correct >= target.value * best.correct - 1e-9
    return correct >= target.value * n - 1e-9


def run_all(out: Path, data_dir: str | None, seeds: list[int], targets: list[str],
            names: list[str], test_fraction: float, cv_folds: int,
            scorer_folds: int = 0) -> list[dict[str, Any]]:
    root = convert_evaldata.data_dir(data_dir)
    rows = []
    for name in names:
        dataset = convert_evaldata.load(name, root)
        for seed in seeds:
            folder = out / name / f"seed{seed}"
            info = convert_evaldata.write_dataset(dataset, folder, seed, test_fraction)
            # Both targets calibrate the same training file with the same folds: one bank
            # so the scorers are fitted once (their fits do not depend on the target).
            bank = cal.ScorerBank(scorer_folds, seed) if scorer_folds else None
            for target in targets:
                workdir = folder / ("run-" + target.replace("%", "pct")
                                    + ("-scorer" if scorer_folds else ""))
                result = run_one(folder / "train.jsonl", folder / "test.jsonl",
                                 folder / "config.toml", workdir, target=target,
                                 cv_folds=cv_folds, seed=seed, scorer_folds=scorer_folds,
                                 scorer_bank=bank)
                result.update(dataset=name, seed=seed, target_arg=target, notes=info["notes"])
                rows.append(result)
                print(_summary(result), file=sys.stderr, flush=True)
    return rows


def _summary(r: dict[str, Any]) -> str:
    p, b = r["pipeline"], r["best_single_test"]
    return (f"{r.get('dataset', r['test'])} seed={r.get('seed', '-')} target={r['target']}: "
            f"accuracy {p['accuracy']:.4f} (best single {b['model']} {b['accuracy']:.4f}), "
            f"cost ${p['cost_usd']:.4f} = {100 * (r['cost_share_of_best'] or 0):.1f}% of "
            f"${b['cost_usd']:.4f}; policy {'; '.join(r['policy'].values())}; "
            f"offline agrees: {r['offline_replay_agrees']}"
            + "".join(f"; agreement rule ({t}: {', '.join(a['models'])}) accuracy "
                      f"{a['accuracy']:.4f} at ${a['cost_usd']:.4f}"
                      for t, a in (r.get("agreement_rule") or {}).items() if a)
            + (f"; vs reference: {r['reference']['accuracy_delta_points']:+.2f} points, "
               f"saving {r['reference']['savings_pct']}%" if r.get("reference") else ""))


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| dataset | seed | target | test n | best single on test (acc, $) | policy acc "
            "| policy $ (% of best) | target met | goal | picked on train: acc | policy |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        p, b = r["pipeline"], r["best_single_test"]
        picked = ", ".join(f"{m} {s['accuracy']:.3f}"
                           for m, s in r["best_single_picked_on_train"].items())
        lines.append(
            f"| {r['dataset']} | {r['seed']} | {r['target_arg']} | {r['queries']['test']} "
            f"| {b['model']} {b['accuracy']:.3f}, ${b['cost_usd']:.3f} | {p['accuracy']:.3f} "
            f"| ${p['cost_usd']:.3f} ({100 * (r['cost_share_of_best'] or 0):.1f}%) "
            f"| {'yes' if r['target_met_on_test'] else 'no'} "
            f"| {'yes' if r['goal_met'] else 'no'} | {picked} "
            f"| {'; '.join(r['policy'].values())} |")
    return head + "\n".join(lines) + "\n"


def pooled(rows: list[dict[str, Any]]) -> str:
    """Per dataset and target, all seeds pooled: total correct answers and total cost of
    the policy against those of each split's best single model on its test queries."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["target_arg"]), []).append(r)
    out = ("| dataset | target | splits | test queries | accuracy: policy / best single "
           "| cost: policy / best single | cost share | target met | goal met "
           "| single picked on train: accuracy, policy's cost share |\n"
           "|---|---|---|---|---|---|---|---|---|---|\n")
    for (name, target), rs in groups.items():
        n = sum(r["queries"]["test"] for r in rs)
        acc = sum(r["pipeline"]["correct"] for r in rs) / n
        best_acc = sum(r["best_single_test"]["correct"] for r in rs) / n
        cost = sum(r["pipeline"]["cost_usd"] for r in rs)
        best_cost = sum(r["best_single_test"]["cost_usd"] for r in rs)
        met = sum(r["target_met_on_test"] for r in rs)
        goal = sum(r["goal_met"] for r in rs)
        picked = [s for r in rs for s in r["best_single_picked_on_train"].values()]
        picked_acc = sum(s["correct"] for s in picked) / n
        picked_cost = sum(s["cost_usd"] for s in picked)
        out += (f"| {name} | {target} | {len(rs)} | {n} | {acc:.3f} / {best_acc:.3f} "
                f"| ${cost:.3f} / ${best_cost:.3f} | {100 * cost / best_cost:.1f}% "
                f"| {met}/{len(rs)} | {goal}/{len(rs)} "
                f"| {picked_acc:.3f}, {100 * cost / picked_cost:.1f}% |\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=Path)
    ap.add_argument("--test", type=Path)
    ap.add_argument("--config", type=Path, help="routing config (default: config.toml next "
                                                "to --train)")
    ap.add_argument("--target", default=None, help="best-accuracy (default), 0.9, 95%%")
    ap.add_argument("--max-cost-usd", type=float, default=None)
    ap.add_argument("--max-rungs", type=int, default=cal.DEFAULT_MAX_RUNGS)
    ap.add_argument("--cv", type=int, default=5, help="cross-validation folds (0: none)")
    ap.add_argument("--workdir", type=Path, help="where run files go (default: a temp dir)")
    ap.add_argument("--all", action="store_true", help="every evaldata dataset")
    ap.add_argument("--only", default="", help="with --all: comma-separated dataset names")
    ap.add_argument("--out", type=Path, help="with --all: output directory")
    ap.add_argument("--data-dir", help="evaldata directory (default $BATCHROUTE_EVALDATA, "
                                       "else ../shared/evaldata)")
    ap.add_argument("--seeds", default=str(convert_evaldata.DEFAULT_SEED),
                    help="with --all: comma-separated split seeds")
    ap.add_argument("--targets", default=",".join(TARGETS), help="with --all")
    ap.add_argument("--test-fraction", type=float, default=convert_evaldata.DEFAULT_TEST_FRACTION)
    ap.add_argument("--scorer", action="store_true",
                    help="let calibration add learned per-query scorers (needs scikit-learn)")
    ap.add_argument("--scorer-folds", type=int, default=cal.DEFAULT_SCORER_FOLDS,
                    help="with --scorer: inner folds for out-of-fold scores")
    ap.add_argument("--policy", type=Path, help="score this policy file (a routing config) "
                                                "on --test instead of calibrating one")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--markdown", action="store_true", help="with --all: print a table")
    args = ap.parse_args(argv)
    configure_logging("WARNING")
    scorer_folds = args.scorer_folds if args.scorer else 0
    if args.all:
        names = [n for n in args.only.split(",") if n] or list(convert_evaldata.DATASETS)
        out = args.out or Path(tempfile.mkdtemp(prefix="batchroute-replay-"))
        rows = run_all(out, args.data_dir, [int(s) for s in args.seeds.split(",")],
                       [t for t in args.targets.split(",") if t], names, args.test_fraction,
                       args.cv, scorer_folds)
        name = "results-scorer.json" if scorer_folds else "results.json"
        (out / name).write_text(json.dumps(rows, indent=2), "utf-8")
        if args.json:
            print(json.dumps(rows, indent=2))
        if args.markdown or not args.json:
            print(pooled(rows))
            print(markdown(rows))
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="batchroute-replay-"))
    if args.policy is not None:
        if args.test is None:
            ap.error("--policy needs --test")
        full = args.config or args.test.parent / "config.toml"
        result = run_one(args.train, args.test, full if full.is_file() else None, workdir,
                         policy_file=args.policy)
        print(json.dumps(result, indent=2) if args.json else _summary(result))
        return 0
    if args.train is None or args.test is None:
        ap.error("--train and --test are required (or --all, or --policy)")
    config = args.config or args.train.parent / "config.toml"
    result = run_one(args.train, args.test, config, workdir, args.target, args.max_cost_usd,
                     args.max_rungs, args.cv, scorer_folds=scorer_folds)
    print(json.dumps(result, indent=2) if args.json else _summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
