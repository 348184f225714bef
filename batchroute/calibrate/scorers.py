"""Learned per-query scorers as candidate checks (thresholds on out-of-fold scores)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from batchroute import scorer as scoring
from batchroute.calibrate.candidates import _plain_and_template
from batchroute.calibrate.replaying import _label, _Option, _Pricer, _sample_body
from batchroute.calibrate.types import (
    DEFAULT_SCORER_FOLDS,
    SCORER,
    SCORER_KEEP_SHARES,
    CalibrationError,
    Score,
    log,
)
from batchroute.completion import Completion, Usage
from batchroute.config import Config
from batchroute.replay import Record
from batchroute.validators import build_validators, passed, run_validators

# --------------------------------------------------------------- learned scorers


class ScorerBank:
    """Fits the learned per-query scorers of one calibration (``batchroute.scorer``).

    A scorer rung keeps a cheap model's answer when P(correct | prompt, answer) is at
    least a threshold. The threshold is chosen on *out-of-fold* scores (each training
    record scored by a scorer fitted on the other inner folds): in-sample scores are
    overconfident exactly on the records the threshold is chosen on. The scorer written
    into the policy is the average of those fold scorers (bagged), so the threshold
    means on new queries what it meant on the out-of-fold scores. Feature rows are hashed
    once per (model, record) and reused by every fold of the cross-validation.
    """

    def __init__(self, folds: int = DEFAULT_SCORER_FOLDS, seed: int = 0,
                 dim: int = scoring.DEFAULT_DIM, c: float = scoring.DEFAULT_C,
                 keep_shares: Sequence[float] = SCORER_KEEP_SHARES, cross: bool = True,
                 ) -> None:
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
        self.cross = cross  # prompt n-grams crossed with short answers (scorer.features)
        self._rows: dict[tuple[str, str], dict[int, float]] = {}
        # Fits depend only on (task, model, which records): calibrating the same training
        # file for another target, with the same seed, reuses them.
        self._fits: dict[tuple[str, str, tuple[str, ...]],
                         tuple[list[float], scoring.Scorer]] = {}
        self.fits = 0
        # model -> (record id -> row, design matrix, its columns) over every registered
        # record: the features are sliced per fold instead of rebuilt per fit.
        self._design: dict[str, tuple[dict[str, int], Any, list[int]]] = {}
        self._registered: dict[str, list[Record]] = {}
        self._stop: dict[str, frozenset[str]] = {}  # task -> prompt n-grams left out

    def register(self, records: Sequence[Record], models: Sequence[str]) -> None:
        """Records every later fit draws from (a task's training records), so each
        model's design matrix is built once."""
        for task in {r.task for r in records} - set(self._stop):
            self._stop[task] = scoring.stop_grams(
                [scoring.prompt_text({"messages": r.messages}) for r in records
                 if r.task == task])
        for m in models:
            known = self._registered.setdefault(m, [])
            ids = {r.id for r in known}
            known.extend(r for r in records if r.id not in ids)

    def _matrix_for(self, model: str, records: Sequence[Record]) -> tuple[Any, list[int]]:
        entry = self._design.get(model)
        if entry is None or any(r.id not in entry[0] for r in records):
            self.register(records, [model])
            pool = self._registered[model]
            matrix, columns = scoring.design([self.row(r, model) for r in pool])
            entry = ({r.id: i for i, r in enumerate(pool)}, matrix, columns)
            self._design[model] = entry
        index, matrix, columns = entry
        return matrix[[index[r.id] for r in records]], columns

    def row(self, record: Record, model: str) -> dict[int, float]:
        key = (model, record.id)
        row = self._rows.get(key)
        if row is None:
            prompt = scoring.prompt_text({"messages": record.messages})
            row = scoring.features(prompt, record.responses[model].samples[0].content,
                                   self.dim, stop=self._stop.get(record.task, frozenset()),
                                   cross=self.cross)
            self._rows[key] = row
        return row

    def fit(self, task: str, records: Sequence[Record], model: str,
            ) -> tuple[list[float], scoring.Scorer]:
        """(out-of-fold scores of ``records``, the bagged scorer of their fold models)."""
        key = (task, model, tuple(r.id for r in records))
        cached = self._fits.get(key)
        if cached is not None:
            return cached
        labels = [_label(r, model, 0) for r in records]
        matrix, columns = self._matrix_for(model, records)
        oof, fold_models = scoring.out_of_fold_design(matrix, columns, labels, self.folds,
                                                       self.seed, self.dim, self.c)
        # Bagged fold models, not a refit on all records: the threshold was chosen on
        # the fold models' out-of-fold scores, and transfers to their average.
        full = scoring.bagged(fold_models, meta={
            "model": model, "task": task, "label": "P(answer correct | prompt, answer)",
            "trained_on": len(records), "positives": int(sum(labels))},
            stop=self._stop.get(task, frozenset()), cross=self.cross)
        self.fits += self.folds
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
