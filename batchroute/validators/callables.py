"""Checks that read more than one completion's text: consensus over sampled choices,
the learned scorer (which also reads the request), and operator-supplied callables."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from batchroute import consensus
from batchroute.completion import Completion
from batchroute.validators.base import Verdict, _Base, _snip
from batchroute.validators.checks import _call_result


class _Consensus(_Base):
    """Accept when at least `min_agree` of the first `k` choices give the same answer.

    Fewer than k choices (a provider that ignores ``n``) is a failure, not a pass on
    thinner evidence: the threshold was chosen for k samples.
    """

    def __init__(self, name: str, k: int, min_agree: int, extract: str | None,
                 case_sensitive: bool) -> None:
        super().__init__(name)
        self.k = k
        self.min_agree = min_agree
        self.extract = extract
        self.case_sensitive = case_sensitive

    def check(self, completion: Completion) -> Verdict:
        samples = consensus.samples_of(completion)
        if len(samples) < self.k:
            return self._fail(f"only {len(samples)} of {self.k} samples returned "
                              "(does the provider support n?)")
        t = consensus.tally(samples[: self.k], self.extract, self.case_sensitive)
        score = t.votes / self.k
        if t.votes >= self.min_agree:
            return self._ok(score, f"{t.votes}/{self.k} samples agree")
        if not t.answer:
            return self._fail(f"no answer in any of {self.k} samples", score)
        return self._fail(f"{t.votes}/{self.k} samples agree on {_snip(t.answer)!r}, "
                          f"{self.min_agree} needed", score)


class _Agree(_Base):
    """Accept when at least ``min_agree`` answers - this one and those of the job's
    earlier rungs (escalation history) - give the same answer as this one: a
    cross-model vote, one call per model. Alone on the first rung it can never pass
    (one answer), which is how a ladder collects a cheap answer for a later rung to
    compare with. Answers compare as consensus does (``extract``, ``case_sensitive``).
    """

    wants_earlier = True

    def __init__(self, name: str, min_agree: int, extract: str | None,
                 case_sensitive: bool) -> None:
        super().__init__(name)
        self.min_agree = min_agree
        self.extract = extract
        self.case_sensitive = case_sensitive

    def check(self, completion: Completion) -> Verdict:
        return self.check_earlier(completion, ())

    def check_earlier(self, completion: Completion, earlier: tuple[str, ...]) -> Verdict:
        mine = consensus.answer_key(completion.content, self.extract, self.case_sensitive)
        if not mine:
            return self._fail("no answer to compare")
        votes = 1 + sum(consensus.answer_key(e, self.extract, self.case_sensitive) == mine
                        for e in earlier)
        score = votes / (1 + len(earlier))
        if votes >= self.min_agree:
            return self._ok(score, f"{votes} of {1 + len(earlier)} answers agree")
        return self._fail(f"{votes} of {1 + len(earlier)} answers agree on {_snip(mine)!r}, "
                          f"{self.min_agree} needed", score)


class _AnswerIn(_Base):
    """Accept only when the answer (normalised as consensus does) is one of ``labels``:
    answer-conditioned acceptance, e.g. keep a cheap model's "yes" (99% right) and
    escalate its "no" (87% right)."""

    def __init__(self, name: str, labels: list[str], extract: str | None,
                 case_sensitive: bool) -> None:
        super().__init__(name)
        self.extract = extract
        self.case_sensitive = case_sensitive
        self.labels = frozenset(consensus.answer_key(x, None, case_sensitive) for x in labels)

    def check(self, completion: Completion) -> Verdict:
        key = consensus.answer_key(completion.content, self.extract, self.case_sensitive)
        if key in self.labels:
            return self._ok(1.0)
        return self._fail(f"answer {_snip(key)!r} is not one of the labels kept here", 0.0)


class _ScorerCheck(_Base):
    """Accept when a learned scorer (``batchroute.scorer``, fitted by ``batchroute
    calibrate``) gives the answer P(correct | prompt, answer) >= threshold.

    It reads the request as well as the completion, so the pipeline passes the request
    to ``run_validators``; without it the check fails (escalates) rather than guess.
    """

    wants_request = True

    def __init__(self, name: str, model: Any, threshold: float, label: str) -> None:
        super().__init__(name)
        self.model = model
        self.threshold = threshold
        self.label = label

    def check(self, completion: Completion) -> Verdict:
        return self._fail("scorer: the request was not passed to the check")

    def check_request(self, completion: Completion, request: Mapping[str, Any]) -> Verdict:
        p = self.model.score_request(request, completion.content)
        if p >= self.threshold:
            return self._ok(p, f"scorer {self.label}: {p:.3f} >= {self.threshold:g}")
        return self._fail(f"scorer {self.label}: P(correct) {p:.3f} < {self.threshold:g}", p)


class _Custom(_Base):
    """Wraps an operator-supplied callable; its failures become failed verdicts so
    that one buggy check cannot take down a whole batch."""

    def __init__(self, name: str, label: str, func: Callable[..., Any], params: dict[str, Any]):
        super().__init__(name)
        self.label = label
        self.params = params
        self._func = func

    def check(self, completion: Completion) -> Verdict:
        try:
            result = self._func(completion, **self.params)
            if isinstance(result, Verdict):
                # The spec's type is what callers group by, whatever the callable wrote.
                result = replace(result, validator=self.name)
                if not result.ok and not result.reason:
                    result = replace(result, reason=f"{self.label}: failed")
                return result
            ok, why = _call_result(self.label, result)
        except Exception as exc:  # see class docstring
            return Verdict(
                self.name, False, f"{self.label}: raised {type(exc).__name__}: {_snip(str(exc))}"
            )
        if ok:
            return Verdict(self.name, True, why)
        return Verdict(self.name, False, f"{self.label}: {why or 'failed'}")


class _Unresolved(_Base):
    """Stands in for a custom check whose mapping was not supplied (validate_specs
    only); it is never handed to callers, but fails safe if it ever were."""

    def __init__(self, name: str, label: str) -> None:
        super().__init__(name)
        self.label = label

    def check(self, completion: Completion) -> Verdict:
        return Verdict(self.name, False, f"{self.label}: custom validator was never resolved")

