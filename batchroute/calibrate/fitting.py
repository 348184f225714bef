"""The entry point: calibrate every task of a training file."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

from batchroute.calibrate.crossval import Setting, _cross_validate
from batchroute.calibrate.replaying import _label, _Pricer, model_order
from batchroute.calibrate.scorers import ScorerBank
from batchroute.calibrate.search import _prepare, _search
from batchroute.calibrate.types import (
    DEFAULT_AGREE_FRACTIONS,
    DEFAULT_K_GRID,
    DEFAULT_MAX_RUNGS,
    Calibration,
    CalibrationError,
    Target,
    TaskCalibration,
)
from batchroute.config import Config
from batchroute.replay import Record


def calibrate(records: Sequence[Record], config: Config, target: Target | None = None,
              max_rungs: int = DEFAULT_MAX_RUNGS, k_grid: Sequence[int] = DEFAULT_K_GRID,
              agree_fractions: Sequence[float] = DEFAULT_AGREE_FRACTIONS,
              models: Sequence[str] | None = None, source: str = "", cv_folds: int = 0,
              seed: int = 0, scorer_folds: int = 0,
              scorer_bank: ScorerBank | None = None, reference: str | None = None,
              free_top: bool = False, try_agree: bool = True,
              try_answer_in: bool = True) -> Calibration:
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

    ``reference`` is the user's model: accuracy targets are held against it, savings
    are reported against it, and every ladder ends on it (models dearer than it are not
    used) unless ``free_top``. Default: the records' requested model when they name one
    (``model``, from the batch lines' ``body.model``; the most common), else the most
    accurate single model on each task's records (ties: the cheaper), chosen once on
    all of them, not per fold.

    Besides the task's checks, consensus votes and scorers, a rung may keep its answer
    when it agrees with the rungs' below (``agree``, unless not ``try_agree``), or only
    when it is one of the labels the model is most often right on (``answer_in``,
    unless not ``try_answer_in``).
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
        if bank is not None:
            bank.register(recs, usable)
        ref = choose_reference(recs, usable, pricer, reference)
        if not free_top:  # the ladder ends on the reference: nothing dearer is used
            usable = usable[: usable.index(ref) + 1]
        cv = None
        setting = Setting(max_rungs, target.margin, scorer=bank is not None)
        if cv_folds >= 2 and len(recs) >= 2 * cv_folds:
            cv = _cross_validate(task, recs, usable, config, pricer, target, max_rungs,
                                 cv_folds, seed, k_grid, agree_fractions, bank=bank,
                                 reference=ref, free_top=free_top, try_agree=try_agree,
                                 try_answer_in=try_answer_in)
            setting = cv.chosen
        prep = _prepare(task, recs, usable, config, pricer, k_grid, agree_fractions,
                        setting.max_rungs, bank, ref, free_top, try_agree, try_answer_in)
        result = _search(prep, replace(target, margin=setting.margin), setting.max_rungs,
                         config, scorer=setting.scorer)
        result.cv = cv
        results[task] = result
    return Calibration(results, target, order, len(records), source)


def choose_reference(records: Sequence[Record], models: Sequence[str], pricer: _Pricer,
                     reference: str | None = None) -> str:
    """The reference model of one task's records (see :func:`calibrate`)."""
    if reference is None:
        asked = Counter(r.model for r in records if r.model)
        if asked:
            reference = asked.most_common(1)[0][0]
    if reference is not None:
        if reference not in models:
            raise CalibrationError(
                f"reference model {reference!r} is not usable: it must be in the routing "
                f"config and answer every training query (usable: {', '.join(models)})")
        return reference
    def key(m: str) -> tuple[int, float]:
        return (sum(_label(r, m, 0) for r in records),
                -sum(pricer.cost(m, *r.responses[m].usage(1)) for r in records))
    return max(models, key=key)
