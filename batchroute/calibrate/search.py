"""The search over ladders and check settings for the cheapest policy meeting a target."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from batchroute.calibrate import types
from batchroute.calibrate.candidates import (
    _answer_in_options,
    _rung_options,
    agree_template,
    answer_keys,
)
from batchroute.calibrate.replaying import _label, _Option, _Pricer, evaluate
from batchroute.calibrate.scorers import ScorerBank, _frontier, _scorer_options
from batchroute.calibrate.types import _EPS, Policy, Rung, Score, Target, TaskCalibration
from batchroute.config import Config
from batchroute.replay import Record

# ------------------------------------------------------------------------ the search


@dataclass
class _Candidate:
    rungs: tuple[tuple[int, _Option | None], ...]  # (model index, option; None at top)
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
    reference: str = ""  # what accuracy is held against (default: best_single)
    tops: frozenset[int] | None = None  # model indices a ladder may end on (None: any)
    keys: list[list[str]] = field(default_factory=list)  # [model][record]: first answer
    agree: dict[str, Any] | None = None  # the `agree` spec to try (None: not tried)


def _prepare(task: str, records: list[Record], models: list[str], config: Config,
             pricer: _Pricer, k_grid: Sequence[int], fractions: Sequence[float],
             max_rungs: int, bank: ScorerBank | None = None, reference: str | None = None,
             free_top: bool = True, checks_agree: bool = True,
             checks_answer_in: bool = True) -> _Prepared:
    """Everything the search needs about ``records``. With ``reference`` and not
    ``free_top``, ``models`` must end on the reference: every ladder ends there."""
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
    # Answers compare as the task's consensus check compares them (its extract, case).
    template = agree_template(task_checks)
    agree = template if checks_agree else None
    keys = [answer_keys(records, m, template) for m in models]
    if checks_answer_in and max_rungs >= 2:
        for j, m in enumerate(models[:-1]):
            options[j] += _answer_in_options(records, m, keys[j], top_correct[j],
                                             top_cost[j], template)
    if bank is not None and max_rungs >= 2:
        frontier = set(_frontier(models, singles))
        for j, m in enumerate(models[:-1]):
            if m in frontier:
                options[j] += _scorer_options(records, m, task, task_checks, config, pricer,
                                              bank)
    reference = reference or best_single
    tops = None if free_top else frozenset({models.index(reference)})
    return _Prepared(task, records, models, top_correct, top_cost, options, singles,
                     best_single, reference, tops, keys, agree)


def _required(target: Target, best_correct: int, n: int) -> tuple[int | None, float | None]:
    """(correct answers needed, total cost cap) for ``n`` records; ``best_correct`` is
    the reference's correct answers on them."""
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
            scorer: bool = True) -> TaskCalibration:
    """Depth-first over ladders (rungs cheapest first) and check settings per rung,
    pruning any prefix already dearer than a policy that meets the target. Without
    ``scorer``, learned-scorer settings are left out."""
    models = prep.models
    options = prep.options if scorer else [[o for o in opts if not o.learned]
                                           for opts in prep.options]
    top_correct, top_cost = prep.top_correct, prep.top_cost
    n = len(prep.records)
    kind = target.kind
    required, cap = _required(target, prep.singles[prep.reference].correct, n)
    tops = prep.tops

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

    keys = prep.keys
    ref_correct = top_correct[models.index(prep.reference)]  # _prepare: always in models
    rung_z = types.RUNG_Z if kind == "best" else None

    def rung_holds(opt: _Option, remaining: list[int]) -> bool:
        """The rung's kept answers are at least the reference's on the same queries
        (types.RUNG_Z): wins minus losses clear rung_z standard deviations."""
        if rung_z is None or opt.collects:
            return True
        wins = losses = 0
        for i in remaining:
            if opt.accepted[i] and opt.correct[i] != ref_correct[i]:
                if opt.correct[i]:
                    wins += 1
                else:
                    losses += 1
        return wins - losses >= rung_z * math.sqrt(wins + losses)

    def agree_options(prefix: tuple[tuple[int, _Option | None], ...], j: int,
                      remaining: list[int]) -> list[_Option]:
        """`agree` at a rung of model j above ``prefix``: keep its answer when at least
        m answers (its own and the rungs' below) agree. With nothing below, it only
        collects an answer for a later agree rung (accepts nothing)."""
        if prep.agree is None:
            return []
        prior = [opt.keys if opt is not None and opt.keys is not None else keys[pj]
                 for pj, opt in prefix]
        mine = keys[j]
        out = []
        for m in range(2, max(3, len(prior) + 2)):
            accepted = [False] * n
            for i in remaining:
                if mine[i]:
                    accepted[i] = 1 + sum(p[i] == mine[i] for p in prior) >= m
            out.append(_Option(({**prep.agree, "min_agree": m},), tuple(accepted),
                               tuple(top_correct[j]), tuple(top_cost[j]), tuple(mine),
                               collects=not prior))
        return out

    def search(prefix: tuple[tuple[int, _Option | None], ...], last: int,
               remaining: list[int], correct: int, cost: float) -> None:
        for j in range(last + 1, len(models)):
            if prefix and (tops is None or j in tops):  # singles were offered up front
                offer(_Candidate(prefix + ((j, None),),
                                 correct + sum(top_correct[j][i] for i in remaining),
                                 cost + sum(top_cost[j][i] for i in remaining)))
            if len(prefix) + 2 > max_rungs or j == len(models) - 1:
                continue
            for opt in [*options[j], *agree_options(prefix, j, remaining)]:
                if opt.collects and len(prefix) + 3 > max_rungs:
                    continue  # no room for the agree rung it collects for
                step = cost + sum(opt.cost[i] for i in remaining)
                if cap is not None and step > cap + _EPS:
                    continue
                if cap is None and best is not None and step > best.cost + _EPS:
                    continue  # already dearer than a policy that meets the target
                if not rung_holds(opt, remaining):
                    continue  # keeps answers worse than the reference's: see types.RUNG_Z
                kept = [i for i in remaining if not opt.accepted[i]]
                if not kept or (len(kept) == len(remaining) and not opt.collects):
                    continue  # accepts everything (a single model) or nothing (pure cost)
                got = correct + sum(opt.correct[i] for i in remaining if opt.accepted[i])
                if required is not None and got + len(kept) < required:
                    continue  # even a perfect model above cannot reach the target
                search(prefix + ((j, opt),), j, kept, got, step)

    # Single models first, so the pruning bound is tight from the start.
    for j in range(len(models)):
        if tops is not None and j not in tops:
            continue
        offer(_Candidate(((j, None),), sum(top_correct[j]), sum(top_cost[j])))
    search((), -1, list(range(n)), 0, 0.0)

    chosen = best or fallback
    assert chosen is not None
    rungs = tuple(Rung(models[j], () if o is None else o.checks) for j, o in chosen.rungs)
    policy = Policy(prep.task, rungs)
    return TaskCalibration(task=prep.task, policy=policy,
                           train=evaluate(policy, prep.records, config), singles=prep.singles,
                           best_single=prep.best_single, required_correct=required,
                           cost_cap_usd=cap, met=best is not None, candidates=scored,
                           max_rungs=max_rungs, margin=target.margin,
                           reference=prep.reference)
