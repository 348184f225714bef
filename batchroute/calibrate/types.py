"""The vocabulary of calibration: rungs, policies, scores, targets and results."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import structlog

from batchroute import consensus

if TYPE_CHECKING:
    from batchroute.calibrate.crossval import CrossValidation



DEFAULT_K_GRID = (3, 5, 8, 10, 15, 20)
DEFAULT_AGREE_FRACTIONS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_MAX_RUNGS = 3
DEFAULT_TOLERANCE = 0.003  # accuracy a policy may lose to the reference: 0.3 points
# One-sided confidence of the paired lower bound. 0.75, not 0.9: with ~1,000 training
# queries a 90% bound is ~0.6 points below the mean, so a cascade had to beat the reference
# by ~0.3 points out of fold to be kept, and on data where cheap models nearly match it
# none was (0% saving). At 0.75 the evaldata splits still keep the reference wherever a
# cascade lost on test (MoT DATE needs 0.7+: its 185-query halves), see benchmarks/README.
DEFAULT_CONFIDENCE = 0.75
# At the best-accuracy target, every rung below the top must keep answers at least as
# good as the reference's on the queries it keeps: its wins over the reference there (it
# right, the reference wrong) must exceed its losses by RUNG_Z standard deviations,
# sqrt(wins + losses). Without it, the cheapest ladder meeting the target could pair a
# rung that loses a few answers with one that wins a few back, and the losing rung is the
# one the training sample flatters: simulated OVERRULING, world 18, split 7 kept
# `gemini-1.5-flash [answer_in] -> claude` on 8 wins against 7 losses in training (its
# true rate: 1 win to 3 losses; -1.31 points on 40,000 fresh queries, -2.31 on the test
# half). Over 60 simulated splits (6 worlds), 0.5 cut the policies worse than the
# reference in expectation from 6 to 1 and the worst test half from -2.31 to -0.65
# points, with the goal met on 39 test halves instead of 36 (benchmarks/README.md).
# None: no per-rung check.
RUNG_Z: float | None = 0.5
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


def _summary(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A check spec for reports: an inline scorer's weights replaced by their count."""
    model = spec.get("model")
    if spec.get("type") != SCORER or not isinstance(model, Mapping):
        return dict(spec)
    return {**spec, "model": {"weights": len(model.get("weights") or ()),
                              **dict(model.get("meta") or {})}}


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

    kinds: ``best`` (at least the reference model's accuracy), ``relative`` (a
    fraction of it), ``accuracy`` (an absolute accuracy), ``cost``.

    ``tolerance`` and ``confidence`` say what "at least" means out of fold: a policy is
    accepted when the lower ``confidence`` bound of its paired accuracy difference with
    the reference (same held-out records) is above minus ``tolerance`` (a share: 0.003
    is 0.3 points). Both only apply with cross-validation.
    """

    kind: str
    value: float = 1.0
    margin: float = 0.0  # accuracy points required on top of the floor, on training data
    tolerance: float = DEFAULT_TOLERANCE
    confidence: float = DEFAULT_CONFIDENCE

    @classmethod
    def parse(cls, target: str | None, max_cost_usd: float | None = None,
              margin: float = 0.0, tolerance: float = DEFAULT_TOLERANCE,
              confidence: float = DEFAULT_CONFIDENCE) -> Target:
        if not 0 <= tolerance < 1:
            raise CalibrationError("--tolerance is a share of accuracy: 0.003 is 0.3 points")
        if not 0.5 <= confidence < 1:
            raise CalibrationError("--confidence must be in [0.5, 1), e.g. 0.9")
        t = cls._parse(target, max_cost_usd, margin)
        return replace(t, tolerance=tolerance, confidence=confidence)

    @classmethod
    def _parse(cls, target: str | None, max_cost_usd: float | None = None,
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
        if self.kind != "cost":
            extra += (f" (out of fold: lower {self.confidence:.0%} bound of the paired "
                      f"difference >= -{100 * self.tolerance:g} points)")
        return {"best": f"accuracy >= the reference model's{extra}",
                "relative": f"accuracy >= {self.value:.1%} of the reference model's{extra}",
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
    reference: str = ""  # the model accuracy and savings are held against (top rung)

    def to_dict(self) -> dict[str, Any]:
        best = self.singles[self.best_single]
        ref = self.reference or self.best_single
        return {
            "reference": {"model": ref, **self.singles[ref].to_dict()},
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
