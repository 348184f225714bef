"""Replaying recorded answers through a rung or a whole policy, as the pipeline would.

The same validators, consensus vote and pricing as ``batchroute run``: what calibration
promises is what the pipeline then does."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from batchroute import consensus, pricing
from batchroute.calibrate.types import SCORER, CalibrationError, Policy, Rung, Score
from batchroute.completion import Completion, Usage
from batchroute.config import Config, ModelConfig
from batchroute.replay import Record
from batchroute.validators import build_validators, passed, run_validators

# ------------------------------------------------------------------ scoring one rung


@dataclass(frozen=True)
class _Option:
    checks: tuple[dict[str, Any], ...]
    accepted: tuple[bool, ...]
    correct: tuple[bool, ...]
    cost: tuple[float, ...]
    # The answer this rung gives per record (normalised, as an `agree` check above it
    # compares); None: the model's first sample.
    keys: tuple[str, ...] | None = None
    # Accepting nothing is useful only to collect an answer for a later `agree` rung.
    collects: bool = False

    @property
    def learned(self) -> bool:
        """A learned scorer decides here (cross-validation tries ladders without them)."""
        return any(c.get("type") == SCORER for c in self.checks)



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
                 validators: Sequence[Any], pricer: _Pricer,
                 earlier: Sequence[str] = ()) -> tuple[bool, bool, float]:
    """(accepted, correct, cost) of asking ``model`` under ``checks``, as the pipeline
    would: ask for k choices when a consensus check is on, put the majority first, run
    the checks on that completion (``earlier``: the answers of the rungs below, for an
    ``agree`` check), and bill the recorded usage."""
    ok, right, cost, _ = rung_step(record, model, checks, validators, pricer, earlier)
    return ok, right, cost


def rung_step(record: Record, model: str, checks: Sequence[Mapping[str, Any]],
              validators: Sequence[Any], pricer: _Pricer, earlier: Sequence[str] = (),
              ) -> tuple[bool, bool, float, str | None]:
    """rung_outcome plus the answer given (None when no call could be made)."""
    response = record.responses[model]
    n = consensus.samples_wanted(checks)
    if n > len(response.samples):
        # The replay (like a provider without n) cannot give k samples: the pipeline's
        # call would be rejected, so the job would fail here.
        return False, False, 0.0, None
    prompt, completion_tokens = response.usage(n)
    cost = pricer.cost(model, prompt, completion_tokens)
    contents = [s.content for s in response.samples[:n]]
    if not validators:
        return True, _label(record, model, 0), cost, contents[0]
    completion = Completion(content=contents[0], finish_reason="stop",
                            usage=Usage(prompt, completion_tokens), model=model,
                            alternatives=tuple(contents[1:]), body=_sample_body(contents))
    completion = consensus.majority_first(completion, checks)
    ok = passed(run_validators(validators, completion, request={"messages": record.messages},
                               earlier=earlier))
    chosen = contents.index(completion.content)
    return ok, _label(record, model, chosen), cost, completion.content


@dataclass(frozen=True)
class Outcome:
    """One record through a policy: right or not, what it cost, which model answered
    (None: the job failed)."""

    correct: bool
    cost: float
    model: str | None


def outcomes(policy: Policy, records: Sequence[Record], config: Config,
             pricer: _Pricer | None = None) -> list[Outcome]:
    """Replay ``records`` through ``policy`` one by one, exactly as the pipeline would:
    each rung sees the answers of the rungs below it (escalation history)."""
    pricer = pricer or _Pricer(config)
    built = [build_validators(list(r.checks), config.custom_validators) for r in policy.rungs]
    out = []
    for record in records:
        earlier: list[str] = []
        cost = 0.0
        result = Outcome(False, 0.0, None)
        for i, rung in enumerate(policy.rungs):
            if rung.model not in record.responses:
                result = Outcome(False, cost, None)  # the replay has no answer: job fails
                break
            ok, right, c, answer = rung_step(record, rung.model, rung.checks, built[i],
                                             pricer, earlier)
            cost += c
            if ok or i == len(policy.rungs) - 1:
                result = Outcome(right, cost, rung.model)
                break
            if answer is not None:
                earlier.append(answer)
        out.append(result)
    return out


def score_of(results: Sequence[Outcome]) -> Score:
    answered: dict[str, int] = {}
    for o in results:
        if o.model is not None:
            answered[o.model] = answered.get(o.model, 0) + 1
    return Score(len(results), sum(o.correct for o in results),
                 sum(o.cost for o in results), answered,
                 sum(o.model is None for o in results))


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


def evaluate(policy: Policy, records: Sequence[Record], config: Config) -> Score:
    """Replay ``records`` through ``policy`` offline, exactly as the pipeline would."""
    return score_of(outcomes(policy, records, config))


def single_scores(records: Sequence[Record], config: Config) -> dict[str, Score]:
    """Each model alone on ``records`` (models missing an answer to any record skipped)."""
    out = {}
    for m in model_order(records, config):
        if all(m in r.responses for r in records):
            out[m] = evaluate(Policy("", (Rung(m),)), records, config)
    return out
