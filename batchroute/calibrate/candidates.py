"""Candidate check settings at one rung: the task's checks and consensus votes."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from batchroute import consensus
from batchroute.calibrate.replaying import _label, _Option, _Pricer, _sample_body
from batchroute.calibrate.types import _MAX_SUBSET_CHECKS
from batchroute.completion import Completion, Usage
from batchroute.config import Config
from batchroute.replay import Record
from batchroute.validators import build_validators, passed, run_validators

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
    extract, case = template.get("extract"), bool(template.get("case_sensitive", False))

    def add(checks: tuple[dict[str, Any], ...], accepted: list[bool], correct: list[bool],
            cost: list[float]) -> None:
        if not checks:
            return  # accepting everything below the top is just a single model
        signature = (tuple(accepted), tuple(correct), tuple(cost), tuple(keys))
        if signature not in seen:
            seen[signature] = _Option(checks, *signature)

    for k in [1, *grid]:
        votes = [{**template, "k": k, "min_agree": a} for a in grid.get(k, [])]
        votes_built = [build_validators([v], config.custom_validators) for v in votes]
        cost: list[float] = []
        correct: list[bool] = []
        keys: list[str] = []
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
            keys.append(consensus.answer_key(completion.content, extract, case))
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


def agree_template(task_checks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The `agree` spec calibration tries: answers compared as the task's consensus
    check compares them (its ``extract``, ``case_sensitive``), if it has one."""
    _, template = _plain_and_template(task_checks)
    return {"type": "agree", **{k: template[k] for k in ("extract", "case_sensitive")
                                if k in template}}


def answer_keys(records: Sequence[Record], model: str, spec: Mapping[str, Any]) -> list[str]:
    """The normalised first answer of ``model`` per record, as ``spec`` compares them."""
    extract, case = spec.get("extract"), bool(spec.get("case_sensitive", False))
    return [consensus.answer_key(r.responses[model].samples[0].content, extract, case)
            for r in records]


def _answer_in_options(records: Sequence[Record], model: str, keys: Sequence[str],
                       correct: Sequence[bool], cost: Sequence[float],
                       spec: Mapping[str, Any]) -> list[_Option]:
    """Answer-conditioned acceptance: keep this model's answer only when it is one of
    the labels it is most often right on (prefixes of its labels by training precision).
    Tried only when the answers are labels: a few distinct answers covering almost all
    records (classification), each label seen at least 5 times."""
    counts: dict[str, list[int]] = {}
    for k, c in zip(keys, correct, strict=True):
        if k:
            counts.setdefault(k, [0, 0])
            counts[k][0] += 1
            counts[k][1] += c
    n = len(keys)
    frequent = {k: v for k, v in counts.items() if v[0] >= 5}
    if not frequent or len(counts) > 20 or sum(v[0] for v in frequent.values()) < 0.8 * n:
        return []
    ranked = sorted(frequent, key=lambda k: (-frequent[k][1] / frequent[k][0], k))
    out = []
    for size in range(1, len(ranked) + (len(frequent) < len(counts))):
        labels = ranked[:size]
        if size == len(ranked) and len(frequent) == len(counts):
            break  # every label: accepts everything
        wanted = set(labels)
        accepted = tuple(k in wanted for k in keys)
        check = {"type": "answer_in", "labels": sorted(labels),
                 **{k: v for k, v in spec.items() if k in ("extract", "case_sensitive")}}
        out.append(_Option((check,), accepted, tuple(correct), tuple(cost), tuple(keys)))
    return out
