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

Modules, in the order of the steps: ``types`` (rungs, policies, scores, targets),
``replaying`` (a rung or a policy replayed as the pipeline runs it), ``candidates``
(check settings per rung), ``scorers`` (learned per-query scorers), ``search`` (the
cheapest ladder meeting a target), ``crossval`` (out-of-fold figures of the procedure),
``fitting`` (:func:`calibrate`), ``policy`` (the routing config and its header),
``tomlio`` (writing TOML).
"""

from __future__ import annotations

from batchroute.calibrate.crossval import (
    CV_MARGINS,
    CV_REPEATS,
    CrossValidation,
    Setting,
)
from batchroute.calibrate.fitting import (
    calibrate,
    choose_reference,
)
from batchroute.calibrate.policy import (
    agreement_rule,
    header,
    policy_config,
    policy_from_config,
    scorer_dir_for,
)
from batchroute.calibrate.replaying import (
    Outcome,
    evaluate,
    model_order,
    outcomes,
    rung_outcome,
    single_scores,
)
from batchroute.calibrate.scorers import (
    ScorerBank,
)
from batchroute.calibrate.tomlio import (
    load_raw_config,
    to_toml,
)
from batchroute.calibrate.types import (
    DEFAULT_AGREE_FRACTIONS,
    DEFAULT_CONFIDENCE,
    DEFAULT_K_GRID,
    DEFAULT_MAX_RUNGS,
    DEFAULT_SCORER_FOLDS,
    DEFAULT_TOLERANCE,
    SCORER,
    SCORER_KEEP_SHARES,
    Calibration,
    CalibrationError,
    Policy,
    Rung,
    Score,
    Target,
    TaskCalibration,
)

__all__ = [
    "Outcome",
    "agreement_rule",
    "policy_from_config",
    "outcomes",
    "choose_reference",
    "CV_MARGINS",
    "CV_REPEATS",
    "Calibration",
    "CalibrationError",
    "CrossValidation",
    "DEFAULT_AGREE_FRACTIONS",
    "DEFAULT_K_GRID",
    "DEFAULT_MAX_RUNGS",
    "DEFAULT_SCORER_FOLDS",
    "DEFAULT_TOLERANCE",
    "DEFAULT_CONFIDENCE",
    "Policy",
    "Rung",
    "SCORER",
    "SCORER_KEEP_SHARES",
    "Score",
    "ScorerBank",
    "Setting",
    "Target",
    "TaskCalibration",
    "calibrate",
    "evaluate",
    "header",
    "load_raw_config",
    "model_order",
    "policy_config",
    "rung_outcome",
    "scorer_dir_for",
    "single_scores",
    "to_toml",
]
