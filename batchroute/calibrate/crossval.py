"""Cross-validation of the calibration procedure itself: honest out-of-fold figures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from batchroute.calibrate.replaying import _Pricer, evaluate
from batchroute.calibrate.scorers import ScorerBank
from batchroute.calibrate.search import _prepare, _required, _search
from batchroute.calibrate.types import _EPS, Policy, Rung, Score, Target
from batchroute.config import Config
from batchroute.replay import Record


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
