"""A stand-in for FrugalGPT's OVERRULING answers: simulated answers, real accuracies and prices.

Issue #16 was measured on a classification dataset of real answers from 12 LLM APIs whose
per-query answers are not in ../shared/evaldata (FrugalGPT keeps them in release assets
that cannot be reached here). Its summary CSV is there: the test accuracy and the mean
cost per query of ten 2024 models on OVERRULING (1,080 test queries, a Yes/No question).
This module draws per-query answers that reproduce those figures, so calibration can be
tried where, unlike every evaldata dataset, several cheap models come close to the
reference. **The answers are simulated**: figures on this dataset say what calibration
does when such structure exists, not what it saves on the real data.

How answers are drawn (an item-response model, the usual way correlated errors are
simulated): query q has a label (Yes for ~40%) and a difficulty d_q (most are easy; a
share are hard for every model; ~1.5% are "label noise" that almost every model gets
wrong); model m answers right with probability sigmoid(a_m + b_m * s_q - d_q), where
s_q = +1 for Yes and -1 for No, so each model leans to one label as real models do, and
a_m is solved so the model's expected accuracy is its recorded one. Prompts are the
dataset's real few-shot prefix and a generated sentence (the scorer finds nothing in
them, as on a dataset whose queries look alike).
"""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

from batchroute.replay import Record, Response, Sample

PROMPT_TOKENS = 400  # the e5 prefix (~1,500 characters) and one sentence
LABELS = ("Yes", "No")
MODEL_IDS = {  # the summary's Method -> a model name used in the config
    "gpt-4o-2024-05-13": "gpt-4o", "claude-3-5-sonnet-20240620": "claude-3.5-sonnet",
    "Meta-Llama-3-70B-Instruct-Turbo": "llama-3-70b", "gemma-2-9b-it": "gemma-2-9b"}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _models(root: Path) -> dict[str, tuple[float, float]]:
    """model -> (test accuracy, USD per query) from the FrugalGPT summary."""
    path = root / "frugalgpt" / "summary" / "summary_OVERRULING_e5_full_2024.csv"
    out = {}
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["Method"] != "FrugalGPT":
                name = MODEL_IDS.get(row["Method"], row["Method"])
                out[name] = (float(row["Test_acc"]), float(row["Test_cost"]))
    return out


def _solve(target: float, lean: float, queries: list[tuple[int, float]]) -> float:
    """a such that the mean probability of a right answer over ``queries`` is ``target``."""
    lo, hi = -10.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        acc = sum(_sigmoid(mid + lean * s - d) for s, d in queries) / len(queries)
        lo, hi = (mid, hi) if acc < target else (lo, mid)
    return (lo + hi) / 2


def _queries(rng: random.Random, n: int) -> list[tuple[int, float]]:
    """n queries as (label sign, difficulty)."""
    out = []
    for _ in range(n):
        s = 1 if rng.random() < 0.4 else -1
        u = rng.random()
        d = (8.0 if u < 0.015 else rng.gauss(2.5, 1.0) if u < 0.10 else rng.gauss(-2.0, 1.0))
        out.append((s, d))
    return out


# Words real OVERRULING sentences turn on (the prefix's examples: "we hereby disavow",
# "it is expressly overruled", "disapprove deruyter"), and words of ordinary holdings.
CUES = {"Yes": ["overruled", "overrule", "disavow", "disapprove", "abrogated", "recede",
                "expressly", "hereby", "overruling", "abandon"],
        "No": ["testimony", "miles", "ordered", "according", "remedies", "enforcement",
               "prior", "vehicle", "accident", "jury"]}

WORDS = ["court", "holding", "precedent", "we", "disavow", "evidence", "appeal", "ruling",
         "statute", "the", "defendant", "plaintiff", "decision", "case", "overrule",
         "affirm", "language", "below", "question", "motion"]


def _cued(words: list[str], truth: str, other: str, d: float, signal: float,
          rng: random.Random) -> list[str]:
    """``words`` with some swapped for cue words: each word, with probability
    signal * sigmoid(-d) (an easy query reads clearly, a hard one hardly at all), becomes
    a cue of the true label, one cue in ten misleading (of the other label)."""
    out = []
    for w in words:
        if rng.random() < signal * _sigmoid(-d):
            w = rng.choice(CUES[truth] if rng.random() < 0.9 else CUES[other])
        out.append(w)
    return out


def _answered(rng: random.Random, queries: list[tuple[int, float]],
              params: dict[str, tuple[float, float]], prefix: str, tag: str,
              signal: float = 0.0, text_rng: random.Random | None = None) -> list[Record]:
    recs = []
    for i, (s, d) in enumerate(queries):
        truth = LABELS[0] if s > 0 else LABELS[1]
        other = LABELS[1] if s > 0 else LABELS[0]
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 20))]
        if signal and text_rng is not None:  # its own generator: the answers do not change
            words = _cued(words, truth, other, d, signal, text_rng)
        sentence = " ".join(words)
        responses = {}
        for m, (a, lean) in params.items():
            right = rng.random() < _sigmoid(a + lean * s - d)
            responses[m] = Response(PROMPT_TOKENS, (Sample(truth if right else other, 1,
                                                           right),))
        text = f"{prefix}\nContext: {sentence}.\nQuestion: Is it overruling?\nAnswer:"
        recs.append(Record(id=f"{tag}-{i:05d}", task="overruling",
                           messages=[{"role": "user", "content": text}],
                           responses=responses, reference=truth))
    return recs


WORLD = 16  # the world every table was measured on before worlds could be chosen


def records(root: Path, n: int = 2160, seed: int = WORLD, fresh: int = 0, signal: float = 0.0,
            ) -> tuple[list[Record], dict[str, tuple[float, float]], list[Record]]:
    """(records, model -> (USD per 1M input tokens, per 1M output tokens), fresh records).

    ``fresh`` more queries are drawn from the same world (the same models' parameters)
    with a generator of their own, so the first ``n`` do not change: a policy's expected
    difference from the reference, measured on many fresh queries, is free of the noise
    of which 1,080 queries a test half happens to hold.

    ``signal`` > 0 puts cue words of the true label into the sentences (``_cued``), so a
    scorer reading the prompt can learn the task, as on the real OVERRULING sentences
    (issue #16 measured out-of-fold AUC 0.95 on the cheapest rung there). The answers
    are the same as with ``signal`` 0: only the prompts differ."""
    rng = random.Random(seed)
    models = _models(root)
    prefix = (root / "frugalgpt" / "config" / "prompt" / "OVERRULING" / "prefix_e5.txt"
              ).read_text("utf-8")
    queries = _queries(rng, n)
    params = {}
    for m, (acc, _) in models.items():
        lean = rng.uniform(-1.0, 1.0)
        params[m] = (_solve(acc, lean, queries), lean)
    recs = _answered(rng, queries, params, prefix, "overruling-sim", signal,
                     random.Random(seed + 7))
    extra: list[Record] = []
    if fresh:
        other = random.Random(seed + 1_000_003)
        extra = _answered(other, _queries(other, fresh), params, prefix, "overruling-fresh",
                          signal, random.Random(seed + 2_000_003))
    # A price per 1M input tokens that makes one query cost the recorded mean; output 0.
    prices = {m: (cost / PROMPT_TOKENS * 1e6, 0.0) for m, (_, cost) in models.items()}
    return recs, prices, extra
