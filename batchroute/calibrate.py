"""Calibrate the cascade from a labelled sample: the cheapest policy that meets a target.

Input: a replay file of training queries with every candidate model's recorded answer
and whether it was correct (``batchroute.replay``), and the routing config that prices
those models and lists the checks each task may use. Output: for every task, a ladder
(which models to keep, in which order: tier skipping is simply leaving models out), and
at each rung below the top the checks whose failure escalates, including the consensus
parameters (samples k, votes needed). ``policy_config`` turns that into a routing config
a user runs with.

Why a search and not a formula: the quantities that matter (how often a check accepts a
wrong cheap answer, what k samples cost) interact per query, and the candidate space is
small enough (tens of models and check settings, ladders of at most a few rungs) to
evaluate exactly. Every candidate is scored by running *the pipeline's own code* on the
recorded answers - the same validators, the same consensus vote and reordering, the
same pricing - so what calibration promises is what ``batchroute run`` then does.

Honesty rules, enforced by construction:

* Only the records passed in are looked at; evaluating on held-out data is a separate
  call (:func:`evaluate`) the caller makes with data calibration never saw.
* The targets are relative to what single models achieve on the *same* training
  records, and nothing is tuned on the evaluation split.
* A check never runs at the top rung: there it could only turn an answer into a failed
  job, never into a better answer.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from batchroute import consensus, pricing
from batchroute import scorer as scoring
from batchroute.completion import Completion, Usage
from batchroute.config import Config, ModelConfig
from batchroute.replay import Record
from batchroute.validators import build_validators, passed, run_validators

DEFAULT_K_GRID = (3, 5, 8, 10, 15, 20)
DEFAULT_AGREE_FRACTIONS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_MAX_RUNGS = 3
DEFAULT_SCORER_FOLDS = 5  # inner folds giving out-of-fold scores to choose thresholds on
# Scorer thresholds tried per rung: the score above which this share of the training
# answers (out of fold) is kept. Quantiles, not fixed probabilities: a scorer's scores
# sit wherever its base rate puts them.
SCORER_KEEP_SHARES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
SCORER = "scorer"
_MAX_SUBSET_CHECKS = 4  # beyond this many configured checks, try none or all, not subsets
_EPS = 1e-12
log = structlog.get_logger("batchroute.calibrate")


class CalibrationError(ValueError):
    """The training data or the target cannot give a policy; the message says why."""


# ----------------------------------------------------------------------------- types


@dataclass(frozen=True)
class Rung:
    """One step of the ladder: a model, and the checks that decide whether to keep its
    answer (empty at the top rung, whose answer is always kept)."""

    model: str
    checks: tuple[dict[str, Any], ...] = ()

    def describe(self) -> str:
        if not self.checks:
            return self.model
        parts = []
        for c in self.checks:
            if c.get("type") == consensus.CONSENSUS:
                parts.append(f"consensus {c.get('min_agree')}/{c.get('k')}")
            elif c.get("type") == SCORER:
                parts.append(f"scorer >= {c.get('threshold'):.3f}")
            else:
                parts.append(str(c.get("type")))
        return f"{self.model} [{', '.join(parts)}]"


@dataclass(frozen=True)
class Policy:
    task: str
    rungs: tuple[Rung, ...]

    def describe(self) -> str:
        return " -> ".join(r.describe() for r in self.rungs)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "ladder": [r.model for r in self.rungs],
                "rungs": [{"model": r.model, "checks": [_summary(c) for c in r.checks]}
                          for r in self.rungs],
                "describe": self.describe()}


@dataclass(frozen=True)
class Score:
    """How a policy (or a single model) did on a set of records."""

    queries: int
    correct: int
    cost_usd: float
    answered_by: dict[str, int] = field(default_factory=dict)  # model -> jobs ending there
    failed: int = 0  # jobs with no answer (e.g. a model had no recorded answer)

    @property
    def accuracy(self) -> float:
        return self.correct / self.queries if self.queries else 0.0

    @property
    def cost_per_query(self) -> float:
        return self.cost_usd / self.queries if self.queries else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"queries": self.queries, "correct": self.correct,
                "accuracy": round(self.accuracy, 6), "cost_usd": round(self.cost_usd, 8),
                "cost_per_query_usd": round(self.cost_per_query, 10),
                "answered_by": dict(self.answered_by), "failed": self.failed}


@dataclass(frozen=True)
class Target:
    """What "acceptable" means: an accuracy floor to meet at least cost, or a cost cap
    (mean USD per query) to meet at best accuracy.

    kinds: ``best`` (at least the best single model's accuracy), ``relative`` (a
    fraction of it), ``accuracy`` (an absolute accuracy), ``cost``.
    """

    kind: str
    value: float = 1.0
    margin: float = 0.0  # accuracy points required on top of the floor, on training data

    @classmethod
    def parse(cls, target: str | None, max_cost_usd: float | None = None,
              margin: float = 0.0) -> Target:
        if max_cost_usd is not None:
            if target not in (None, "", "best-accuracy"):
                raise CalibrationError("give either --target or --max-cost-usd, not both")
            if max_cost_usd <= 0:
                raise CalibrationError("--max-cost-usd must be > 0 (mean USD per query)")
            return cls("cost", float(max_cost_usd))
        text = (target or "best-accuracy").strip().lower()
        if text in ("best", "best-accuracy"):
            return cls("best", 1.0, margin)
        try:
            if text.endswith("%"):
                value = float(text[:-1]) / 100
                kind = "relative"
            else:
                value = float(text)
                kind = "accuracy"
        except ValueError:
            raise CalibrationError(
                f"--target {target!r}: use best-accuracy, an accuracy such as 0.9, or a share "
                "of the best single model's accuracy such as 95%") from None
        if not 0 < value <= 1.5:
            raise CalibrationError(f"--target {target!r}: out of range")
        return cls(kind, value, margin)

    def describe(self) -> str:
        extra = f" + {self.margin:g} margin" if self.margin else ""
        return {"best": f"accuracy >= best single model's{extra}",
                "relative": f"accuracy >= {self.value:.1%} of the best single model's{extra}",
                "accuracy": f"accuracy >= {self.value:g}{extra}",
                "cost": f"mean cost <= ${self.value:g} per query, best accuracy"}[self.kind]


@dataclass
class TaskCalibration:
    task: str
    policy: Policy
    train: Score
    singles: dict[str, Score]
    best_single: str
    required_correct: int | None  # accuracy targets
    cost_cap_usd: float | None  # cost target: total over the training records
    met: bool
    candidates: int
    max_rungs: int = DEFAULT_MAX_RUNGS
    margin: float = 0.0
    cv: CrossValidation | None = None

    def to_dict(self) -> dict[str, Any]:
        best = self.singles[self.best_single]
        return {
            "task": self.task, "policy": self.policy.to_dict(), "train": self.train.to_dict(),
            "best_single": {"model": self.best_single, **best.to_dict()},
            "singles": {m: s.to_dict() for m, s in self.singles.items()},
            "required_accuracy": (None if self.required_correct is None
                                  else round(self.required_correct / self.train.queries, 6)),
            "cost_cap_per_query_usd": (None if self.cost_cap_usd is None
                                       else self.cost_cap_usd / self.train.queries),
            "met_on_train": self.met, "candidates_scored": self.candidates,
            "cost_vs_best_single": (round(self.train.cost_usd / best.cost_usd, 6)
                                    if best.cost_usd else None),
            "max_rungs": self.max_rungs, "margin": self.margin,
            "cross_validation": self.cv.to_dict() if self.cv else None,
        }


@dataclass
class Calibration:
    tasks: dict[str, TaskCalibration]
    target: Target
    model_order: list[str]  # cheapest first: the tier order of the written config
    queries: int
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "queries": self.queries,
                "target": self.target.describe(), "model_order": self.model_order,
                "tasks": {t: c.to_dict() for t, c in self.tasks.items()}}


# ------------------------------------------------------------------ scoring one rung


@dataclass(frozen=True)
class _Option:
    checks: tuple[dict[str, Any], ...]
    accepted: tuple[bool, ...]
    correct: tuple[bool, ...]
    cost: tuple[float, ...]


def _summary(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A check spec for reports: an inline scorer's weights replaced by their count."""
    model = spec.get("model")
    if spec.get("type") != SCORER or not isinstance(model, Mapping):
        return dict(spec)
    return {**spec, "model": {"weights": len(model.get("weights") or ()),
                              **dict(model.get("meta") or {})}}


def _canonical(spec: Mapping[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def _sample_body(contents: Sequence[str]) -> dict[str, Any]:
    return {"object": "chat.completion", "choices": [
        {"index": i, "message": {"role": "assistant", "content": c}, "finish_reason": "stop"}
        for i, c in enumerate(contents)]}


class _Pricer:
    """Per-call cost with the pipeline's own pricing function, memoised on the usage."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._cache: dict[tuple[str, int, int], float] = {}

    def model(self, name: str) -> ModelConfig:
        model = self.config.models.get(name)
        if model is None:
            raise CalibrationError(f"model {name!r} is in the training data but not in the "
                                   f"routing config {self.config.source}: give it a tier and "
                                   "a price there")
        return model

    def cost(self, name: str, prompt: int, completion: int) -> float:
        key = (name, prompt, completion)
        cost = self._cache.get(key)
        if cost is None:
            cost = pricing.model_cost(self.model(name), Usage(prompt, completion))
            self._cache[key] = cost
        return cost


def _label(record: Record, model: str, sample: int) -> bool:
    s = record.responses[model].samples[sample]
    if s.correct is None:
        raise CalibrationError(f"record {record.id!r}: the answer of {model!r} has no "
                               "'correct' label; calibration needs labelled answers")
    return s.correct


def rung_outcome(record: Record, model: str, checks: Sequence[Mapping[str, Any]],
                 validators: Sequence[Any], pricer: _Pricer) -> tuple[bool, bool, float]:
    """(accepted, correct, cost) of asking ``model`` under ``checks``, as the pipeline
    would: ask for k choices when a consensus check is on, put the majority first, run
    the checks on that completion, and bill the recorded usage."""
    response = record.responses[model]
    n = consensus.samples_wanted(checks)
    if n > len(response.samples):
        # The replay (like a provider without n) cannot give k samples: the pipeline's
        # call would be rejected, so the job would fail here.
        return False, False, 0.0
    prompt, completion_tokens = response.usage(n)
    cost = pricer.cost(model, prompt, completion_tokens)
    contents = [s.content for s in response.samples[:n]]
    if not validators:
        return True, _label(record, model, 0), cost
    completion = Completion(content=contents[0], finish_reason="stop",
                            usage=Usage(prompt, completion_tokens), model=model,
                            alternatives=tuple(contents[1:]), body=_sample_body(contents))
    completion = consensus.majority_first(completion, checks)
    ok = passed(run_validators(validators, completion, request={"messages": record.messages}))
    chosen = contents.index(completion.content)
    return ok, _label(record, model, chosen), cost


# ------------------------------------------------------------------ candidate checks


def _plain_and_template(task_checks: Sequence[Mapping[str, Any]],
                        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The task's configured checks (without any "tiers": calibration decides those)
    and the consensus settings (extract, case) to vary k and min_agree around."""
    plain = [{k: v for k, v in c.items() if k != "tiers"} for c in task_checks
             if c.get("type") != consensus.CONSENSUS]
    template = next((dict(c) for c in task_checks if c.get("type") == consensus.CONSENSUS), {})
    template = {k: v for k, v in template.items() if k not in ("tiers", "k", "min_agree")}
    return plain, {**template, "type": consensus.CONSENSUS}


def _vote_grid(samples: int, k_grid: Sequence[int],
               fractions: Sequence[float]) -> dict[int, list[int]]:
    """k -> the min_agree values to try, for every k the recorded samples allow."""
    ks = {k for k in k_grid if 2 <= k <= samples}
    if samples >= 2 and not ks:
        ks = {samples}
    return {k: sorted({min(k, max(2, math.ceil(f * k - 1e-9))) for f in fractions})
            for k in sorted(ks)}


def _rung_options(records: Sequence[Record], model: str, task_checks: Sequence[Mapping[str, Any]],
                  config: Config, pricer: _Pricer, k_grid: Sequence[int],
                  fractions: Sequence[float]) -> list[_Option]:
    """Every check setting worth trying at a rung of ``model``, scored on ``records``.

    Settings: each subset of the task's configured checks, alone or with a consensus
    vote over a grid of (k, min_agree). A setting's checks all run on one completion,
    so each check is run once per (record, k) and the settings combine the verdicts;
    the checks, the vote and the reordering are the pipeline's own (rung_outcome is the
    same thing for one setting, and evaluate() re-checks whole policies). Settings with
    an identical effect on every record are kept once, the simplest first.
    """
    plain, template = _plain_and_template(task_checks)
    indices = range(len(plain))
    subsets: list[tuple[int, ...]] = (
        [c for r in range(len(plain) + 1) for c in itertools.combinations(indices, r)]
        if len(plain) <= _MAX_SUBSET_CHECKS else [(), tuple(indices)])
    checks_built = [build_validators([c], config.custom_validators) for c in plain]
    samples = min(len(r.responses[model].samples) for r in records)
    grid = _vote_grid(samples, k_grid, fractions)
    seen: dict[tuple[Any, ...], _Option] = {}

    def add(checks: tuple[dict[str, Any], ...], accepted: list[bool], correct: list[bool],
            cost: list[float]) -> None:
        if not checks:
            return  # accepting everything below the top is just a single model
        signature = (tuple(accepted), tuple(correct), tuple(cost))
        if signature not in seen:
            seen[signature] = _Option(checks, *signature)

    for k in [1, *grid]:
        votes = [{**template, "k": k, "min_agree": a} for a in grid.get(k, [])]
        votes_built = [build_validators([v], config.custom_validators) for v in votes]
        cost: list[float] = []
        correct: list[bool] = []
        plain_ok: list[list[bool]] = [[] for _ in plain]
        vote_ok: list[list[bool]] = [[] for _ in votes]
        for record in records:
            response = record.responses[model]
            prompt, completion_tokens = response.usage(k)
            cost.append(pricer.cost(model, prompt, completion_tokens))
            contents = [s.content for s in response.samples[:k]]
            completion = Completion(content=contents[0], finish_reason="stop",
                                    usage=Usage(prompt, completion_tokens), model=model,
                                    alternatives=tuple(contents[1:]),
                                    body=_sample_body(contents))
            if votes:
                completion = consensus.majority_first(completion, votes[:1])
            correct.append(_label(record, model, contents.index(completion.content)))
            for i, built in enumerate(checks_built):
                plain_ok[i].append(passed(run_validators(built, completion)))
            for i, built in enumerate(votes_built):
                vote_ok[i].append(passed(run_validators(built, completion)))
        for subset in subsets:
            base = [all(plain_ok[i][r] for i in subset) for r in range(len(records))]
            checks = tuple(plain[i] for i in subset)
            if k == 1:
                add(checks, base, correct, cost)
                continue
            for v, ok in zip(votes, vote_ok, strict=True):
                add((*checks, v), [b and o for b, o in zip(base, ok, strict=True)], correct,
                    cost)
    return list(seen.values())


# --------------------------------------------------------------- learned scorers


class ScorerBank:
    """Fits the learned per-query scorers of one calibration (``batchroute.scorer``).

    A scorer rung keeps a cheap model's answer when P(correct | prompt, answer) is at
    least a threshold. The threshold is chosen on *out-of-fold* scores (each training
    record scored by a scorer fitted on the other inner folds): in-sample scores are
    overconfident exactly on the records the threshold is chosen on. The scorer written
    into the policy is then fitted on all the records given. Feature rows are hashed
    once per (model, record) and reused by every fold of the cross-validation.
    """

    def __init__(self, folds: int = DEFAULT_SCORER_FOLDS, seed: int = 0,
                 dim: int = scoring.DEFAULT_DIM, c: float = scoring.DEFAULT_C,
                 keep_shares: Sequence[float] = SCORER_KEEP_SHARES) -> None:
        if folds < 2:
            raise CalibrationError("scorer folds must be >= 2")
        try:
            scoring._sklearn()  # fail now, with the install hint, not deep in a search
        except scoring.ScorerError as e:
            raise CalibrationError(str(e)) from None
        self.folds = folds
        self.seed = seed
        self.dim = dim
        self.c = c
        self.keep_shares = tuple(keep_shares)
        self._rows: dict[tuple[str, str], dict[int, float]] = {}
        # Fits depend only on (task, model, which records): calibrating the same training
        # file for another target, with the same seed, reuses them.
        self._fits: dict[tuple[str, str, tuple[str, ...]],
                         tuple[list[float], scoring.Scorer]] = {}
        self.fits = 0

    def row(self, record: Record, model: str) -> dict[int, float]:
        key = (model, record.id)
        row = self._rows.get(key)
        if row is None:
            prompt = scoring.prompt_text({"messages": record.messages})
            row = scoring.features(prompt, record.responses[model].samples[0].content,
                                   self.dim)
            self._rows[key] = row
        return row

    def fit(self, task: str, records: Sequence[Record], model: str,
            ) -> tuple[list[float], scoring.Scorer]:
        """(out-of-fold scores of ``records``, the scorer fitted on all of them)."""
        key = (task, model, tuple(r.id for r in records))
        cached = self._fits.get(key)
        if cached is not None:
            return cached
        rows = [self.row(r, model) for r in records]
        labels = [_label(r, model, 0) for r in records]
        oof = scoring.out_of_fold(rows, labels, self.folds, self.seed, self.dim, self.c)
        full = scoring.fit(rows, labels, self.dim, c=self.c,
                           meta={"model": model, "task": task,
                                 "label": "P(answer correct | prompt, answer)"})
        self.fits += self.folds + 1
        log.debug("scorer_fitted", task=task, model=model, records=len(records),
                  positives=sum(labels), weights=len(full.weights),
                  out_of_fold_auc=_auc(oof, labels))
        self._fits[key] = (oof, full)
        return oof, full


def _auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve (ties count half): how well scores rank right answers
    above wrong ones, 0.5 being no signal. For the log: what a scorer could do here."""
    pos = sorted(s for s, y in zip(scores, labels, strict=True) if y)
    neg = sorted(s for s, y in zip(scores, labels, strict=True) if not y)
    if not pos or not neg:
        return None
    import bisect

    wins = sum(bisect.bisect_left(neg, p) + 0.5 * (bisect.bisect_right(neg, p)
                                                   - bisect.bisect_left(neg, p)) for p in pos)
    return round(wins / (len(pos) * len(neg)), 4)


def _thresholds(oof: Sequence[float], shares: Sequence[float]) -> list[float]:
    """Score thresholds keeping about each share of the answers (rounded down to 6
    digits, so the written threshold keeps exactly what the search counted)."""
    ranked = sorted(oof, reverse=True)
    out = set()
    for share in shares:
        k = max(1, min(len(ranked), math.ceil(share * len(ranked) - 1e-9)))
        out.add(math.floor(ranked[k - 1] * 1e6) / 1e6)
    return sorted(out)


def _scorer_options(records: Sequence[Record], model: str, task: str,
                    task_checks: Sequence[Mapping[str, Any]], config: Config, pricer: _Pricer,
                    bank: ScorerBank) -> list[_Option]:
    """Scorer settings at a rung of ``model``: a threshold from the grid, alone or on top
    of all the task's configured checks, each as the pipeline would run it on a single
    (n = 1) answer; acceptance counted with out-of-fold scores."""
    oof, fitted = bank.fit(task, records, model)
    model_json = fitted.to_dict()
    plain, _ = _plain_and_template(task_checks)
    built = build_validators(plain, config.custom_validators) if plain else []
    cost, correct, plain_ok = [], [], []
    for record in records:
        response = record.responses[model]
        prompt, completion_tokens = response.usage(1)
        cost.append(pricer.cost(model, prompt, completion_tokens))
        correct.append(_label(record, model, 0))
        if built:
            content = response.samples[0].content
            completion = Completion(content=content, finish_reason="stop",
                                    usage=Usage(prompt, completion_tokens), model=model,
                                    body=_sample_body([content]))
            plain_ok.append(passed(run_validators(built, completion)))
    bases: list[tuple[tuple[dict[str, Any], ...], list[bool]]] = [((), [True] * len(records))]
    if built:
        bases.append((tuple(plain), plain_ok))
    seen: set[tuple[bool, ...]] = set()
    out = []
    for checks, base in bases:
        for t in _thresholds(oof, bank.keep_shares):
            accepted = tuple(b and s >= t for b, s in zip(base, oof, strict=True))
            if accepted in seen:
                continue
            seen.add(accepted)
            spec = {"type": SCORER, "threshold": t, "model": model_json}
            out.append(_Option((*checks, spec), accepted, tuple(correct), tuple(cost)))
    return out


def _frontier(models: Sequence[str], singles: Mapping[str, Score]) -> list[str]:
    """Models (cheapest first) more accurate than every cheaper one: the only ones worth
    a learned scorer, which keeps the search small on 11-model datasets (a model both
    dearer and less accurate than another is a poor first guess to keep)."""
    out: list[str] = []
    best = -1
    for m in models:
        if singles[m].correct > best:
            out.append(m)
            best = singles[m].correct
    return out


# ------------------------------------------------------------------------ the search


@dataclass
class _Candidate:
    rungs: tuple[tuple[int, int | None], ...]  # (model index, option index or None at top)
    correct: int
    cost: float


def _better(a: _Candidate, b: _Candidate | None, kind: str) -> bool:
    """Preference among candidates that meet the target."""
    if b is None:
        return True
    if kind == "cost":
        if a.correct != b.correct:
            return a.correct > b.correct
        if abs(a.cost - b.cost) > _EPS:
            return a.cost < b.cost
    else:
        if abs(a.cost - b.cost) > _EPS:
            return a.cost < b.cost
        if a.correct != b.correct:
            return a.correct > b.correct
    return len(a.rungs) < len(b.rungs)


@dataclass
class _Prepared:
    """Everything the search needs about one task's records, computed once."""

    task: str
    records: list[Record]
    models: list[str]  # cheapest first
    top_correct: list[list[bool]]  # [model][record]: the plain answer (top rung)
    top_cost: list[list[float]]
    options: list[list[_Option]]  # [model]: check settings below the top
    singles: dict[str, Score]
    best_single: str


def _prepare(task: str, records: list[Record], models: list[str], config: Config,
             pricer: _Pricer, k_grid: Sequence[int], fractions: Sequence[float],
             max_rungs: int, bank: ScorerBank | None = None) -> _Prepared:
    n = len(records)
    task_checks = list(config.task(task).validators)
    top_correct = [[_label(r, m, 0) for r in records] for m in models]
    top_cost = [[pricer.cost(m, *r.responses[m].usage(1)) for r in records] for m in models]
    singles = {m: Score(n, sum(top_correct[j]), sum(top_cost[j]), {m: n})
               for j, m in enumerate(models)}
    best_single = max(models, key=lambda m: (singles[m].correct, -singles[m].cost_usd))
    options = [[] if j == len(models) - 1 or max_rungs < 2  # the dearest model: top only
               else _rung_options(records, m, task_checks, config, pricer, k_grid, fractions)
               for j, m in enumerate(models)]
    if bank is not None and max_rungs >= 2:
        frontier = set(_frontier(models, singles))
        for j, m in enumerate(models[:-1]):
            if m in frontier:
                options[j] += _scorer_options(records, m, task, task_checks, config, pricer,
                                              bank)
    return _Prepared(task, records, models, top_correct, top_cost, options, singles,
                     best_single)


def _required(target: Target, best_correct: int, n: int) -> tuple[int | None, float | None]:
    """(correct answers needed, total cost cap) for ``n`` records."""
    if target.kind == "cost":
        return None, target.value * n
    if target.kind == "best":
        floor = best_correct / n
    elif target.kind == "relative":
        floor = target.value * best_correct / n
    else:
        floor = target.value
    return math.ceil((floor + target.margin) * n - 1e-9), None


def _search(prep: _Prepared, target: Target, max_rungs: int, config: Config,
            ) -> TaskCalibration:
    """Depth-first over ladders (rungs cheapest first) and check settings per rung,
    pruning any prefix already dearer than a policy that meets the target."""
    models, options = prep.models, prep.options
    top_correct, top_cost = prep.top_correct, prep.top_cost
    n = len(prep.records)
    kind = target.kind
    required, cap = _required(target, prep.singles[prep.best_single].correct, n)

    def feasible(c: _Candidate) -> bool:
        if cap is not None:
            return c.cost <= cap + _EPS
        assert required is not None
        return c.correct >= required

    best: _Candidate | None = None
    fallback: _Candidate | None = None  # when nothing meets the target
    scored = 0

    def closer(c: _Candidate, f: _Candidate) -> bool:
        """Nearer the target than the fallback so far: more accurate, or cheaper."""
        if cap is None:
            return (c.correct, -c.cost) > (f.correct, -f.cost)
        return (c.cost, -c.correct) < (f.cost, -f.correct)

    def offer(c: _Candidate) -> None:
        nonlocal best, fallback, scored
        scored += 1
        if feasible(c):
            if _better(c, best, kind):
                best = c
        elif fallback is None or closer(c, fallback):
            fallback = c

    def search(prefix: tuple[tuple[int, int | None], ...], last: int, remaining: list[int],
               correct: int, cost: float) -> None:
        for j in range(last + 1, len(models)):
            if prefix:  # single models were offered up front
                offer(_Candidate(prefix + ((j, None),),
                                 correct + sum(top_correct[j][i] for i in remaining),
                                 cost + sum(top_cost[j][i] for i in remaining)))
            if len(prefix) + 2 > max_rungs or not options[j]:
                continue
            for o, opt in enumerate(options[j]):
                step = cost + sum(opt.cost[i] for i in remaining)
                if cap is not None and step > cap + _EPS:
                    continue
                if cap is None and best is not None and step > best.cost + _EPS:
                    continue  # already dearer than a policy that meets the target
                kept = [i for i in remaining if not opt.accepted[i]]
                if not kept or len(kept) == len(remaining):
                    continue  # accepts everything (a single model) or nothing (pure cost)
                got = correct + sum(opt.correct[i] for i in remaining if opt.accepted[i])
                if required is not None and got + len(kept) < required:
                    continue  # even a perfect model above cannot reach the target
                search(prefix + ((j, o),), j, kept, got, step)

    # Single models first, so the pruning bound is tight from the start.
    for j in range(len(models)):
        offer(_Candidate(((j, None),), sum(top_correct[j]), sum(top_cost[j])))
    search((), -1, list(range(n)), 0, 0.0)

    chosen = best or fallback
    assert chosen is not None
    rungs = tuple(Rung(models[j], () if o is None else options[j][o].checks)
                  for j, o in chosen.rungs)
    policy = Policy(prep.task, rungs)
    return TaskCalibration(task=prep.task, policy=policy,
                           train=evaluate(policy, prep.records, config), singles=prep.singles,
                           best_single=prep.best_single, required_correct=required,
                           cost_cap_usd=cap, met=best is not None, candidates=scored,
                           max_rungs=max_rungs, margin=target.margin)


@dataclass(frozen=True)
class Setting:
    """Calibration's own knobs, chosen by cross-validation: how many rungs a ladder may
    have, and how much accuracy above the floor to demand on the training data."""

    max_rungs: int
    margin: float

    def label(self) -> str:
        return f"rungs<={self.max_rungs}, margin={self.margin:g}"


@dataclass
class CrossValidation:
    """Out-of-fold results of each setting: an honest estimate of new-data behaviour,
    computed from the training records alone."""

    folds: int
    chosen: Setting
    settings: dict[str, Score]  # Setting.label() -> pooled out-of-fold score
    baseline: Score  # the best single model, picked on each fold's training part
    repeats: int = 1  # each record is held out once per repeat

    def to_dict(self) -> dict[str, Any]:
        return {"folds": self.folds, "repeats": self.repeats, "chosen": self.chosen.label(),
                "baseline_best_single": self.baseline.to_dict(),
                "settings": {k: v.to_dict() for k, v in self.settings.items()}}


CV_MARGINS = (0.0, 0.01, 0.02, 0.04)
CV_REPEATS = 3


def _settings(target: Target, max_rungs: int) -> list[Setting]:
    margins = (0.0,) if target.kind == "cost" else tuple(
        sorted({target.margin, *(target.margin + m for m in CV_MARGINS)}))
    out = [Setting(1, target.margin)]
    out += [Setting(r, m) for r in range(2, max_rungs + 1) for m in margins]
    return out


def _cross_validate(task: str, records: list[Record], models: list[str], config: Config,
                    pricer: _Pricer, target: Target, max_rungs: int, folds: int, seed: int,
                    k_grid: Sequence[int], fractions: Sequence[float],
                    repeats: int = CV_REPEATS, bank: ScorerBank | None = None,
                    ) -> CrossValidation:
    """Repeated K-fold cross-validation of the calibration procedure itself, per setting.

    Each fold calibrates on the other folds and is scored on itself; the baseline gets
    the same treatment (best single model picked on the other folds). The setting kept
    is the cheapest whose pooled out-of-fold result meets the target against that
    baseline; with none, the most accurate. The single-model setting is always a
    candidate, so "no cascade generalises here" ends in the best single model. Folds
    are drawn ``repeats`` times: with a few hundred records one fold assignment alone
    makes the choice noisy.
    """
    import random

    settings = _settings(target, max_rungs)
    totals = {s: [0, 0.0, 0] for s in settings}  # correct, cost, failed
    base = [0, 0.0]
    runs = []
    for r in range(repeats):
        order = sorted(range(len(records)), key=lambda i: records[i].id)
        random.Random(seed * 1000 + r).shuffle(order)
        fold_of = {i: pos % folds for pos, i in enumerate(order)}
        runs += [(fold_of, f) for f in range(folds)]
    for fold_of, f in runs:
        fit = [r for i, r in enumerate(records) if fold_of[i] != f]
        held = [r for i, r in enumerate(records) if fold_of[i] == f]
        prep = _prepare(task, fit, models, config, pricer, k_grid, fractions, max_rungs,
                        bank)
        b = evaluate(Policy(task, (Rung(prep.best_single),)), held, config)
        base[0] += b.correct
        base[1] += b.cost_usd
        for s in settings:
            fitted = _search(prep, replace(target, margin=s.margin), s.max_rungs, config)
            score = evaluate(fitted.policy, held, config)
            totals[s][0] += score.correct
            totals[s][1] += score.cost_usd
            totals[s][2] += score.failed
    n = len(records) * repeats  # every record is held out once per repeat
    scores = {s: Score(n, int(t[0]), float(t[1]), failed=int(t[2])) for s, t in totals.items()}
    baseline = Score(n, int(base[0]), float(base[1]))
    required, cap = _required(replace(target, margin=0.0), baseline.correct, n)

    def ok(s: Setting) -> bool:
        sc = scores[s]
        return sc.cost_usd <= cap + _EPS if cap is not None else sc.correct >= (required or 0)

    feasible = [s for s in settings if ok(s)]
    if feasible:
        if cap is not None:
            chosen = max(feasible, key=lambda s: (scores[s].correct, -scores[s].cost_usd))
        else:
            chosen = min(feasible, key=lambda s: (scores[s].cost_usd, -scores[s].correct,
                                                  s.max_rungs, s.margin))
    else:
        chosen = max(settings, key=lambda s: (scores[s].correct, -scores[s].cost_usd))
    return CrossValidation(folds, chosen, {s.label(): scores[s] for s in settings}, baseline,
                           repeats)


def model_order(records: Iterable[Record], config: Config) -> list[str]:
    """Models cheapest first by their mean cost per query on these records: the order
    of the ladder's rungs and of the tiers in the written config."""
    pricer = _Pricer(config)
    totals: dict[str, list[float]] = {}
    for r in records:
        for m, resp in r.responses.items():
            if m in config.models:
                totals.setdefault(m, []).append(pricer.cost(m, *resp.usage(1)))
    return sorted(totals, key=lambda m: (sum(totals[m]) / len(totals[m]), m))


def calibrate(records: Sequence[Record], config: Config, target: Target | None = None,
              max_rungs: int = DEFAULT_MAX_RUNGS, k_grid: Sequence[int] = DEFAULT_K_GRID,
              agree_fractions: Sequence[float] = DEFAULT_AGREE_FRACTIONS,
              models: Sequence[str] | None = None, source: str = "", cv_folds: int = 0,
              seed: int = 0, scorer_folds: int = 0,
              scorer_bank: ScorerBank | None = None) -> Calibration:
    """Choose, per task, the cheapest policy meeting ``target`` on ``records`` (only).

    With ``cv_folds`` >= 2, the number of rungs and the safety margin are first chosen
    by cross-validation on ``records`` (see _cross_validate), then the policy is fitted
    on all of ``records`` with them. Tasks with fewer than 2 x cv_folds records skip it.

    With ``scorer_folds`` >= 2, every rung below the top may also keep its model's answer
    on a learned scorer's say-so (see ScorerBank): one scorer per (task, cheap model),
    its threshold chosen on scores out of ``scorer_folds`` inner folds; inside the
    cross-validation each fold fits its own scorers on its own training part. Needs
    scikit-learn (``pip install 'batchroute[calibrate]'``). A ``scorer_bank`` given
    instead is used (and its fits reused) as is.
    """
    target = target or Target("best")
    if not records:
        raise CalibrationError("no training records")
    if max_rungs < 1:
        raise CalibrationError("max_rungs must be >= 1")
    pricer = _Pricer(config)
    bank = scorer_bank or (ScorerBank(scorer_folds, seed) if scorer_folds else None)
    unknown = sorted({m for r in records for m in r.responses} - set(config.models))
    order = [m for m in model_order(records, config) if models is None or m in models]
    by_task: dict[str, list[Record]] = {}
    for r in records:
        by_task.setdefault(r.task, []).append(r)
    results: dict[str, TaskCalibration] = {}
    for task, recs in sorted(by_task.items()):
        if task not in config.tasks:
            raise CalibrationError(f"task {task!r} of the training data has no [tasks.{task}] "
                                   f"profile in {config.source}")
        usable = [m for m in order if all(m in r.responses for r in recs)]
        if not usable:
            raise CalibrationError(f"task {task!r}: no model of the routing config answered "
                                   f"every training query (unpriced: {', '.join(unknown)})")
        cv = None
        setting = Setting(max_rungs, target.margin)
        if cv_folds >= 2 and len(recs) >= 2 * cv_folds:
            cv = _cross_validate(task, recs, usable, config, pricer, target, max_rungs,
                                 cv_folds, seed, k_grid, agree_fractions, bank=bank)
            setting = cv.chosen
        prep = _prepare(task, recs, usable, config, pricer, k_grid, agree_fractions,
                        setting.max_rungs, bank)
        result = _search(prep, replace(target, margin=setting.margin), setting.max_rungs,
                         config)
        result.cv = cv
        results[task] = result
    return Calibration(results, target, order, len(records), source)


def evaluate(policy: Policy, records: Sequence[Record], config: Config) -> Score:
    """Replay ``records`` through ``policy`` offline, exactly as the pipeline would."""
    pricer = _Pricer(config)
    built = [build_validators(list(r.checks), config.custom_validators) for r in policy.rungs]
    correct = failed = 0
    cost = 0.0
    answered: dict[str, int] = {}
    for record in records:
        for i, rung in enumerate(policy.rungs):
            if rung.model not in record.responses:
                failed += 1  # the replay has no answer: the job fails
                break
            ok, right, c = rung_outcome(record, rung.model, rung.checks, built[i], pricer)
            cost += c
            if ok or i == len(policy.rungs) - 1:
                correct += right
                answered[rung.model] = answered.get(rung.model, 0) + 1
                break
    return Score(len(records), correct, cost, answered, failed)


def single_scores(records: Sequence[Record], config: Config) -> dict[str, Score]:
    """Each model alone on ``records`` (models missing an answer to any record skipped)."""
    out = {}
    for m in model_order(records, config):
        if all(m in r.responses for r in records):
            out[m] = evaluate(Policy("", (Rung(m),)), records, config)
    return out


# ---------------------------------------------------------------- the routing config


def policy_config(cal: Calibration, config: Config, raw: dict[str, Any] | None = None,
                  scorer_dir: Path | None = None, base: Path | None = None,
                  ) -> dict[str, Any]:
    """The routing config (as a TOML-ready dict) that runs the calibrated policies.

    Everything but providers, models and tasks is copied from ``raw`` (the input
    config's TOML), so settings such as [simulator] or breakers carry over; the adaptive
    cascade is switched off (see below). Only the kept models are written, renumbered
    cheapest first as tiers 1, 2, ...; each task's ladder lists its rungs' tiers and each
    check carries ``tiers`` = the rungs it decides at.

    Learned scorers are written as JSON files into ``scorer_dir`` (one per task and
    model) and referenced as ``model_file``, relative to ``base`` (the directory of the
    config being written; ``load_config`` reads it relative to the config file);
    without ``scorer_dir`` they stay inline in the spec.
    """
    raw = dict(raw or {})
    kept = [m for m in cal.model_order
            if any(r.model == m for c in cal.tasks.values() for r in c.policy.rungs)]
    tier = {m: i + 1 for i, m in enumerate(kept)}
    out: dict[str, Any] = {k: v for k, v in raw.items()
                           if k not in ("providers", "models", "tasks")}
    raw_models = raw.get("models") or {}
    raw_providers = raw.get("providers") or {}
    providers: dict[str, Any] = {}
    models: dict[str, Any] = {}
    for m in kept:
        mc = config.models[m]
        table = dict(raw_models.get(m) or _model_table(mc))
        table["tier"] = tier[m]
        models[m] = table
        pc = config.providers[mc.provider]
        providers[pc.name] = dict(raw_providers.get(pc.name) or _provider_table(pc))
    tasks: dict[str, Any] = {}
    for name, c in cal.tasks.items():
        checks: dict[str, tuple[dict[str, Any], list[int]]] = {}
        for rung in c.policy.rungs[:-1]:
            for spec in rung.checks:
                if spec.get("type") == SCORER and scorer_dir is not None:
                    spec = _write_scorer(spec, name, rung.model, scorer_dir, base)
                key = _canonical(spec)
                checks.setdefault(key, (dict(spec), []))[1].append(tier[rung.model])
        tasks[name] = {"ladder": [tier[r.model] for r in c.policy.rungs],
                       "validators": [{**spec, "tiers": sorted(tiers)}
                                      for spec, tiers in checks.values()]}
    if "default" not in tasks:
        only = next(iter(tasks.values())) if len(tasks) == 1 else None
        tasks["default"] = dict(only) if only else {"ladder": sorted(tier.values()),
                                                    "validators": []}
    out["providers"] = providers
    out["models"] = models
    out["tasks"] = tasks
    # The calibrated ladder already is the tier-skipping decision, made with labelled
    # answers; the run-time adaptive cascade (validator pass rates, no labels) must not
    # re-decide it.
    out["cascade"] = {**dict(raw.get("cascade") or {}), "enabled": False}
    return out


def scorer_dir_for(output: Path) -> Path:
    """Where the scorers of a policy written to ``output`` go: ``policy.toml`` ->
    ``policy.scorers/`` beside it, so the two move together."""
    return output.parent / f"{output.stem}.scorers"


def _write_scorer(spec: Mapping[str, Any], task: str, model: str, scorer_dir: Path,
                  base: Path | None) -> dict[str, Any]:
    """Move an inline scorer into its own JSON file; the spec then names the file."""
    scorer_dir.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{task}.{model}")
    path = scorer_dir / f"{safe}.json"
    scoring.Scorer.from_dict(spec["model"]).save(path)
    ref = str(path)
    if base is not None:
        try:
            ref = str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            ref = str(path.resolve())
    return {k: v for k, v in spec.items() if k != "model"} | {"model_file": ref}


def _model_table(m: ModelConfig) -> dict[str, Any]:
    table: dict[str, Any] = {"provider": m.provider, "model": m.api_model, "tier": m.tier}
    if m.price is not None:
        price: dict[str, Any] = {"input_per_mtok": m.price.input_per_mtok,
                                 "output_per_mtok": m.price.output_per_mtok}
        if m.price.cached_input_per_mtok is not None:
            price["cached_input_per_mtok"] = m.price.cached_input_per_mtok
        table["price"] = price
    for key in ("price_ref", "price_provider"):
        if getattr(m, key) is not None:
            table[key] = getattr(m, key)
    table["context_window"] = m.context_window
    return table


def _provider_table(p: Any) -> dict[str, Any]:
    table = {"kind": p.kind, "base_url": p.base_url, "timeout_s": p.timeout_s,
             "max_retries": p.max_retries}
    if p.api_key_env:
        table["api_key_env"] = p.api_key_env
    for key in ("rpm", "tpm", "max_concurrency"):
        if getattr(p, key, None) is not None:
            table[key] = getattr(p, key)
    return table


def header(cal: Calibration) -> str:
    """A comment block saying where the policy came from and what it achieved."""
    lines = [f"Written by `batchroute calibrate` from {cal.source or 'a training file'} "
             f"({cal.queries} labelled queries).",
             f"Target: {cal.target.describe()}."]
    for name, c in cal.tasks.items():
        best = c.singles[c.best_single]
        ratio = c.train.cost_usd / best.cost_usd if best.cost_usd else 0.0
        lines.append(f"task {name}: {c.policy.describe()}")
        lines.append(f"  train: accuracy {c.train.accuracy:.4f} at ${c.train.cost_usd:.6f} "
                     f"({ratio:.1%} of {c.best_single}: accuracy {best.accuracy:.4f}, "
                     f"${best.cost_usd:.6f}){'' if c.met else '  TARGET NOT MET'}")
        if c.cv is not None:
            kept = c.cv.settings[c.cv.chosen.label()]
            base = c.cv.baseline
            share = kept.cost_usd / base.cost_usd if base.cost_usd else 0.0
            lines.append(f"  cross-validation ({c.cv.repeats}x{c.cv.folds} folds of the "
                         "training data): kept "
                         f"{c.cv.chosen.label()}; out-of-fold accuracy {kept.accuracy:.4f} vs "
                         f"{base.accuracy:.4f} for the best single model, at {share:.1%} of "
                         "its cost")
    return "".join(f"# {line}\n" for line in lines)


# ------------------------------------------------------------------------------ TOML

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot write {v!r} to TOML")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(str(k))} = {_value(x)}" for k, x in v.items()
                                if x is not None) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(data: Mapping[str, Any], comment: str = "") -> str:
    """Write a config dict as TOML: tables as [sections], anything inside a list inline.

    Small and strict on purpose (the stdlib reads TOML but cannot write it); the result
    is checked by parsing it back.
    """
    out: list[str] = [comment] if comment else []

    def table(path: list[str], d: Mapping[str, Any]) -> None:
        def inline(v: Any) -> bool:  # small leaf tables read better inline: price = {...}
            return len(path) >= 2 and not any(isinstance(x, dict) for x in v.values())

        scalars = [(k, v) for k, v in d.items()
                   if v is not None and (not isinstance(v, dict) or inline(v))]
        subtables = [(k, v) for k, v in d.items() if isinstance(v, dict) and not inline(v)]
        if path and (scalars or not subtables):
            out.append(f"\n[{'.'.join(_key(p) for p in path)}]")
        for k, v in scalars:
            out.append(f"{_key(k)} = {_value(v)}")
        for k, v in subtables:
            table([*path, k], v)

    table([], data)
    text = "\n".join(out).lstrip("\n") + "\n"
    tomllib.loads(text)
    return text


def load_raw_config(config: Config) -> dict[str, Any] | None:
    """The input config's TOML as written, when it came from a file."""
    path = Path(config.source)
    if not path.is_file():
        return None
    data = tomllib.loads(path.read_text("utf-8"))
    sim = data.get("simulator")
    if isinstance(sim, dict) and isinstance(sim.get("replay"), str) and \
            not Path(sim["replay"]).is_absolute():
        sim["replay"] = str((path.resolve().parent / sim["replay"]).resolve())
    return data
