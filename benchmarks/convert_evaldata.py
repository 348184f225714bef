"""Convert the recorded LLM answers in ../shared/evaldata into replay datasets.

For each dataset with per-query, per-model correctness, writes to OUT/<name>/:

* ``replay.jsonl`` - every query, in the replay format (``batchroute.replay``);
* ``train.jsonl`` / ``test.jsonl`` - a seeded split of the same records (what
  ``batchroute calibrate`` may see, and what only the evaluation sees);
* ``config.toml`` - a routing config: one provider on the built-in simulator in replay
  mode, every recorded model with a tier and an explicit price, and the task profile
  whose checks calibration may turn on per rung.

The evaldata files are read in place and never copied into the repository::

    python benchmarks/convert_evaldata.py --out /tmp/replay [NAME ...]
    python benchmarks/convert_evaldata.py --list

The data directory is ``--data-dir``, else ``$BATCHROUTE_EVALDATA``, else
``../shared/evaldata`` next to the repository.

How usage and prices are made, per dataset (the README of each evaldata folder says
what was recorded):

* RouterBench (ARC, Winogrande, MBPP): the recorded USD cost of every call is kept
  exactly. Prices are the list prices the cost column implies (input $/1M from the
  evaldata README; output from the same providers' price sheets); completion tokens are
  counted with tiktoken, and the prompt tokens are set so that price x usage gives the
  recorded cost (each provider counts tokens with its own tokenizer).
* RouteLLM (GSM8K, MMLU): no usage was recorded. Tokens are counted with tiktoken
  (MMLU answers were not recorded either: 1 completion token, the letter); prices are
  the README's blended $24.7 (GPT-4) and $0.24 (Mixtral) per 1M tokens. Contaminated
  prompts are dropped as upstream does.
* MoT (DATE): each GPT-3.5 prompt setting (CoT/PoT x 2) is a model with its 20
  samples; each GPT-4 setting is a model with its 3 samples (sampled runs) and, as a
  separate model, its greedy answer. The served content is the parsed answer upstream
  recorded (PoT programs were executed upstream); completion tokens are those of the
  full generated text; the few-shot prompts are not in the data, so their size is
  estimated from the README's character counts (4 characters a token). Prices from
  the README (gpt-3.5-turbo $1.5/$2, gpt-4 $30/$60 per 1M).
* RouterArena: recorded token usage and the upstream price table; rows scored with
  METEOR (a similarity, not correctness) are dropped; correct = score >= 0.5.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from batchroute.calibrate import to_toml
from batchroute.replay import Record, Response, Sample, write_records
from batchroute.tokens import count_messages, count_text

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SEED = 7
DEFAULT_TEST_FRACTION = 0.5
NON_EMPTY: dict[str, Any] = {"type": "non_empty"}


def data_dir(arg: str | None = None) -> Path:
    """--data-dir, else $BATCHROUTE_EVALDATA, else ../shared/evaldata beside the repo."""
    path = Path(arg or os.environ.get("BATCHROUTE_EVALDATA") or ROOT.parent / "shared"
                / "evaldata")
    if not path.is_dir():
        raise SystemExit(f"evaldata not found at {path}: pass --data-dir or set "
                         "BATCHROUTE_EVALDATA")
    return path


@dataclass
class Dataset:
    name: str
    task: str
    records: list[Record]
    prices: dict[str, tuple[float, float]]  # model -> USD per 1M (input, output)
    checks: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    source: str = ""
    # Simulated datasets only: queries drawn apart from the split, from the same world,
    # on which a policy's expected difference from the reference can be measured.
    fresh: list[Record] = field(default_factory=list)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _dedupe(records: list[Record], notes: list[str]) -> list[Record]:
    """One record per prompt: the replay answers by prompt, and a prompt in both the
    training and the test split would leak the answer into calibration."""
    seen: set[str] = set()
    kept = []
    for r in records:
        if r.key not in seen:
            seen.add(r.key)
            kept.append(r)
    if len(kept) < len(records):
        notes.append(f"{len(records) - len(kept)} duplicate prompt(s) dropped")
    return kept


# ------------------------------------------------------------------------ RouterBench

ROUTERBENCH_PRICES = {  # USD per 1M tokens (input, output)
    "gpt-4-1106-preview": (10.0, 30.0),
    "gpt-3.5-turbo-1106": (1.0, 2.0),
    "claude-v2": (8.0, 24.0),
    "claude-v1": (8.0, 24.0),
    "claude-instant-v1": (0.8, 2.4),
    "meta/llama-2-70b-chat": (0.9, 0.9),
    "mistralai/mixtral-8x7b-chat": (0.6, 0.6),
    "zero-one-ai/Yi-34B-Chat": (0.8, 0.8),
    "meta/code-llama-instruct-34b-chat": (0.776, 0.776),
    "WizardLM/WizardLM-13B-V1.2": (0.3, 0.3),
    "mistralai/mistral-7b-chat": (0.2, 0.2),
}
ROUTERBENCH_FILES = {"arc": "arc_challenge_train.csv", "winogrande": "winograde_train.csv",
                     "mbpp": "mbpp_train.csv"}
ROUTERBENCH_CHECKS: dict[str, list[dict[str, Any]]] = {
    "arc": [NON_EMPTY, {"type": "choices", "choices": ["A", "B", "C", "D"]}],
    "winogrande": [NON_EMPTY, {"type": "choices", "choices": ["A", "B"]}],
    "mbpp": [NON_EMPTY, {"type": "python_syntax"}],
}


def routerbench(root: Path, task: str) -> Dataset:
    csv.field_size_limit(1 << 30)
    path = root / "routerbench_routerdc" / "datasets" / "routerbench_zs" / ROUTERBENCH_FILES[task]
    notes: list[str] = []
    records: list[Record] = []
    blanks = 0
    recorded = {m: 0.0 for m in ROUTERBENCH_PRICES}
    replayed = {m: 0.0 for m in ROUTERBENCH_PRICES}
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if any(row[m] == "" for m in ROUTERBENCH_PRICES):
                blanks += 1
                continue
            prompt = ast.literal_eval(row["prompt"])[0]
            responses = {}
            for m, (pin, pout) in ROUTERBENCH_PRICES.items():
                answer = ast.literal_eval(row[f"{m}|model_response"])
                content = str(answer[0] if isinstance(answer, list) and answer else answer)
                cost = float(row[f"{m}|total_cost"])
                out = count_text(content)
                # Prompt tokens such that list price x usage = the recorded cost.
                prompt_tokens = max(1, round((cost * 1e6 - pout * out) / pin))
                recorded[m] += cost
                replayed[m] += (pin * prompt_tokens + pout * out) / 1e6
                responses[m] = Response(prompt_tokens, (Sample(content, out,
                                                               float(row[m]) >= 0.5),))
            records.append(Record(id=row["sample_id"], task=task, messages=user(prompt),
                                  responses=responses))
    if blanks:
        notes.append(f"{blanks} row(s) with blank correctness dropped (as RouterDC does)")
    records = _dedupe(records, notes)
    worst = max(abs(replayed[m] / recorded[m] - 1) for m in recorded if recorded[m])
    notes.append(f"replayed cost within {worst:.2%} of the recorded cost for every model")
    return Dataset(f"routerbench-{task}", task, records, dict(ROUTERBENCH_PRICES),
                   ROUTERBENCH_CHECKS[task], notes, str(path))


# --------------------------------------------------------------------------- RouteLLM

ROUTELLM_STRONG = "gpt-4-1106-preview"
ROUTELLM_WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
ROUTELLM_PRICES = {ROUTELLM_STRONG: (24.7, 24.7), ROUTELLM_WEAK: (0.24, 0.24)}


def _contaminated(path: Path) -> set[str]:
    with path.open(encoding="utf-8") as f:
        return {json.loads(line)["eval_prompt"] for line in f if line.strip()}


def routellm_gsm8k(root: Path) -> Dataset:
    csv.field_size_limit(1 << 30)
    base = root / "routellm" / "routellm" / "evals" / "gsm8k"
    bad = _contaminated(base / "contaminated_prompts.jsonl")
    records, dropped = [], 0
    with (base / "gsm8k_responses.csv").open(newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if row["prompt"] in bad:
                dropped += 1
                continue
            messages = user(row["prompt"])
            prompt_tokens = count_messages(messages)
            responses = {}
            for m in (ROUTELLM_WEAK, ROUTELLM_STRONG):
                content = row[f"{m}_response"]
                responses[m] = Response(prompt_tokens, (
                    Sample(content, count_text(content), row[m] == "True"),))
            records.append(Record(id=f"gsm8k-{i}", task="gsm8k", messages=messages,
                                  responses=responses))
    notes = [f"{dropped} contaminated prompt(s) dropped (as upstream)"]
    checks = [NON_EMPTY, {"type": "regex", "pattern": r"####\s*\$?-?[0-9][0-9,]*(?:\.[0-9]+)?"}]
    return Dataset("routellm-gsm8k", "gsm8k", _dedupe(records, notes), dict(ROUTELLM_PRICES),
                   checks, notes, str(base))


def routellm_mmlu(root: Path) -> Dataset:
    csv.field_size_limit(1 << 30)
    base = root / "routellm" / "routellm" / "evals" / "mmlu"
    bad = _contaminated(base / "contaminated_prompts.jsonl")
    records, dropped = [], 0
    for path in sorted((base / "responses").glob("mmlu_*.csv")):
        subject = path.stem.removeprefix("mmlu_")
        with path.open(newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f)):
                if row["prompt"] in bad:
                    dropped += 1
                    continue
                messages = user(row["prompt"])
                prompt_tokens = count_messages(messages)
                # No answer text was recorded: a neutral placeholder (never the label).
                responses = {m: Response(prompt_tokens, (Sample("(answer text not recorded)", 1,
                                                                row[m] == "True"),))
                             for m in (ROUTELLM_WEAK, ROUTELLM_STRONG)}
                records.append(Record(id=f"mmlu-{subject}-{i}", task="mmlu", messages=messages,
                                      responses=responses, metadata={"subject": subject}))
    notes = [f"{dropped} contaminated prompt(s) dropped (as upstream)",
             "answer texts were not recorded: output checks have nothing to judge"]
    return Dataset("routellm-mmlu", "mmlu", _dedupe(records, notes), dict(ROUTELLM_PRICES),
                   [NON_EMPTY], notes, str(base))


# -------------------------------------------------------------------------------- MoT

MOT_PREFIX_CHARS = {"cot1": 1785, "cot2": 1676, "pot1": 2577, "pot2": 2472}
MOT_PRICES = {"gpt-3.5-turbo": (1.5, 2.0), "gpt-4": (30.0, 60.0)}


def mot_date(root: Path) -> Dataset:
    base = root / "mot_cascade"
    variants: list[tuple[str, str, str]] = []  # (model name, price key, file)
    for prompt in MOT_PREFIX_CHARS:
        variants.append((f"gpt-3.5-turbo/{prompt}", "gpt-3.5-turbo",
                         f"GPT3_result/date_{prompt}.json"))
    for prompt in MOT_PREFIX_CHARS:
        variants.append((f"gpt-4/{prompt}", "gpt-4", f"GPT4_result/date_{prompt}.json"))
        variants.append((f"gpt-4/{prompt}-greedy", "gpt-4",
                         f"GPT4_result/date_greedy_{prompt}.json"))
    data = {name: json.loads((base / file).read_text("utf-8")) for name, _, file in variants}
    n = len(next(iter(data.values())))
    records = []
    for i in range(n):
        question = data[variants[0][0]][i]["question"]
        answer = data[variants[0][0]][i]["answer"]
        messages = user(question)
        responses = {}
        for name, _, _ in variants:
            row = data[name][i]
            if row["question"] != question:
                raise SystemExit(f"mot: {name} question {i} differs; files out of order?")
            prompt = name.split("/")[1].removesuffix("-greedy")
            prompt_tokens = count_messages(messages) + round(MOT_PREFIX_CHARS[prompt] / 4)
            samples = tuple(
                Sample("" if res is None else str(res), count_text(gen or ""),
                       res is not None and str(res) == answer)
                for gen, res in zip(row["generated"], row["results"], strict=True))
            responses[name] = Response(prompt_tokens, samples)
        records.append(Record(id=f"date-{i}", task="date", messages=messages,
                              responses=responses, reference=answer))
    prices = {name: MOT_PRICES[key] for name, key, _ in variants}
    checks = [NON_EMPTY, {"type": "regex", "pattern": r"\d{2}/\d{2}/\d{4}", "mode": "fullmatch"},
              {"type": "consensus", "k": 5, "min_agree": 4}]
    notes = ["few-shot prompt tokens estimated as characters / 4 (prompts not in the data)"]
    return Dataset("mot-date", "date", _dedupe(records, notes), prices, checks, notes, str(base))


# ------------------------------------------------------------------------ RouterArena

ARENA_MODELS = ("gemini-2.0-flash-001", "claude-3-haiku-20240307")


def routerarena(root: Path) -> Dataset:
    base = root / "routerarena"
    costs = json.loads((base / "model_cost" / "cost.json").read_text("utf-8"))
    rows: dict[str, dict[str, Any]] = {}
    for m in ARENA_MODELS:
        with (base / "cached_results" / f"{m}.jsonl").open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    rows.setdefault(r["global_index"], {})[m] = r
    records, meteor = [], 0
    for gid, by_model in rows.items():
        if set(by_model) != set(ARENA_MODELS):
            continue
        first = by_model[ARENA_MODELS[0]]
        if first["evaluation_result"]["metric"] == "meteor_score":
            meteor += 1
            continue
        responses = {}
        for m, r in by_model.items():
            usage = r["token_usage"]
            responses[m] = Response(int(usage["input_tokens"]), (Sample(
                str(r.get("generated_answer") or ""), int(usage["output_tokens"]),
                float(r["evaluation_result"]["score"]) >= 0.5),))
        records.append(Record(id=gid, task="routerarena", messages=user(first["question"]),
                              responses=responses))
    prices = {m: (float(costs[m]["input_token_price_per_million"]),
                  float(costs[m]["output_token_price_per_million"])) for m in ARENA_MODELS}
    notes = [f"{meteor} METEOR-scored row(s) dropped (similarity, not correctness)"]
    return Dataset("routerarena", "routerarena", _dedupe(records, notes), prices, [NON_EMPTY],
                   notes, str(base))


def overruling_simulated(root: Path, fresh: int = 0, signal: float = 0.0,
                         name: str = "overruling-simulated", world: int | None = None,
                         ) -> Dataset:
    """Simulated answers with FrugalGPT's recorded OVERRULING accuracies and prices
    (``simulated_overruling.py``): not real answers, listed apart from the real data.
    ``fresh``: that many more queries from the same world, kept apart (Dataset.fresh).
    ``signal``: label cue words in the prompts (0: prompts say nothing). ``world``: the
    seed of the simulated world (its models' leanings, its 2,160 queries and answers);
    None is the one every table so far was measured on."""
    import simulated_overruling as sim

    recs, prices, extra = sim.records(root, fresh=fresh, signal=signal,
                                      seed=sim.WORLD if world is None else world)
    recs = [replace(r, model="claude-3.5-sonnet") for r in recs]
    checks = [NON_EMPTY, {"type": "choices", "choices": list(sim.LABELS)}]
    return Dataset(name, "overruling", recs, prices, checks,
                   ["SIMULATED answers (item-response model) reproducing FrugalGPT's "
                    "recorded OVERRULING test accuracies and costs per query"
                    + (f"; prompts carry label cues (signal {signal})" if signal else "")],
                   "frugalgpt/summary/summary_OVERRULING_e5_full_2024.csv",
                   [replace(r, model="claude-3.5-sonnet") for r in extra])


DATASETS: dict[str, Callable[[Path], Dataset]] = {
    "mot-date": mot_date,
    "routerbench-arc": lambda root: routerbench(root, "arc"),
    "routerbench-winogrande": lambda root: routerbench(root, "winogrande"),
    "routerbench-mbpp": lambda root: routerbench(root, "mbpp"),
    "routellm-gsm8k": routellm_gsm8k,
    "routellm-mmlu": routellm_mmlu,
    "routerarena": routerarena,
}
# Not real answers: run only when named (calibration_eval.py --only overruling-simulated).
SIMULATED: dict[str, Callable[[Path, int, int | None], Dataset]] = {
    "overruling-simulated": lambda root, fresh, world: overruling_simulated(
        root, fresh, world=world),
    # The same answers, with sentences that carry cue words of their label, as real
    # OVERRULING sentences do: a learned scorer can read the prompt here (out-of-fold
    # AUC ~0.95 on the cheapest model, as issue #16 measured on the real answers).
    "overruling-simulated-text": lambda root, fresh, world: overruling_simulated(
        root, fresh, 0.6, "overruling-simulated-text", world)}


def load(name: str, root: Path, fresh: int = 0, world: int | None = None) -> Dataset:
    """A dataset by name; a simulated one with ``fresh`` queries of its world apart,
    from world ``world`` (None: the default world)."""
    if name in SIMULATED:
        return SIMULATED[name](root, fresh, world)
    return DATASETS[name](root)


# ------------------------------------------------------------------------------ output


def routing_config(ds: Dataset, replay: str = "replay.jsonl") -> dict[str, Any]:
    """Every recorded model on the replay simulator, tiered by price (cheapest = 1)."""
    levels = sorted({p[0] + p[1] for p in ds.prices.values()})
    models = {m: {"provider": "replay", "model": m, "tier": levels.index(p[0] + p[1]) + 1,
                  "price": {"input_per_mtok": p[0], "output_per_mtok": p[1]},
                  "context_window": 1_000_000}
              for m, p in sorted(ds.prices.items(), key=lambda kv: (sum(kv[1]), kv[0]))}
    profile = {"ladder": list(range(1, len(levels) + 1)), "validators": ds.checks}
    return {
        # No retries: a replayed answer never changes, and a miss is a data error.
        "providers": {"replay": {"kind": "openai", "base_url": "sim://", "timeout_s": 60,
                                 "max_retries": 0}},
        "models": models,
        "tasks": {ds.task: profile, "default": profile},
        "simulator": {"replay": replay},
    }


def split(records: list[Record], seed: int, test_fraction: float,
          ) -> tuple[list[Record], list[Record]]:
    """A seeded random split; the same seed always gives the same split."""
    ids = sorted(r.id for r in records)
    random.Random(seed).shuffle(ids)
    test_ids = set(ids[: round(len(ids) * test_fraction)])
    return ([r for r in records if r.id not in test_ids],
            [r for r in records if r.id in test_ids])


def write_dataset(ds: Dataset, out: Path, seed: int = DEFAULT_SEED,
                  test_fraction: float = DEFAULT_TEST_FRACTION) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    train, test = split(ds.records, seed, test_fraction)
    write_records(out / "replay.jsonl", ds.records)
    write_records(out / "train.jsonl", train)
    write_records(out / "test.jsonl", test)
    comment = (f"# Replay of {ds.name} ({ds.source}), written by "
               "benchmarks/convert_evaldata.py.\n"
               + "".join(f"# {n}\n" for n in ds.notes))
    (out / "config.toml").write_text(to_toml(routing_config(ds), comment), "utf-8")
    info = {"name": ds.name, "task": ds.task, "records": len(ds.records), "train": len(train),
            "test": len(test), "seed": seed, "test_fraction": test_fraction,
            "models": sorted(ds.prices), "notes": ds.notes, "source": ds.source}
    (out / "dataset.json").write_text(json.dumps(info, indent=2), "utf-8")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*",
                    help=f"datasets (default: all): {', '.join(DATASETS)}; simulated, only "
                         f"when named: {', '.join(SIMULATED)}")
    ap.add_argument("--out", type=Path, help="output directory (one folder per dataset)")
    ap.add_argument("--data-dir", help="evaldata directory (default $BATCHROUTE_EVALDATA, else "
                                       "../shared/evaldata)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION)
    ap.add_argument("--list", action="store_true", help="list the datasets and exit")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(DATASETS))
        return 0
    if args.out is None:
        ap.error("--out is required")
    unknown = [n for n in args.names if n not in DATASETS and n not in SIMULATED]
    if unknown:
        ap.error(f"unknown dataset(s) {unknown}; known: {', '.join(DATASETS)}")
    root = data_dir(args.data_dir)
    for name in args.names or list(DATASETS):
        info = write_dataset(load(name, root), args.out / name, args.seed,
                             args.test_fraction)
        print(f"{name}: {info['records']} queries ({info['train']} train / {info['test']} "
              f"test), {len(info['models'])} models -> {args.out / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
