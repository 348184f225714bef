"""Running built checks against a completion and summarising their verdicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from batchroute.completion import Completion
from batchroute.validators.base import Validator, Verdict, _snip


def run_validators(validators: Sequence[Validator], completion: Completion,
                   request: Mapping[str, Any] | None = None,
                   earlier: Sequence[str] | None = None) -> list[Verdict]:
    """Run every check, even after a failure: the escalation record should list all
    problems, and some callers weigh verdicts rather than stopping at the first.

    ``request`` (the request body) is handed to the checks that judge the answer *to
    that query* (``wants_request``, e.g. the learned scorer); the others see only the
    completion, as before. ``earlier`` (the answers of the job's previous rungs, oldest
    first) goes to the checks that compare with them (``wants_earlier``, e.g. ``agree``).
    """
    verdicts: list[Verdict] = []
    for validator in validators:
        try:
            if getattr(validator, "wants_earlier", False):
                check_earlier = validator.check_earlier  # type: ignore[attr-defined]
                verdicts.append(check_earlier(completion, tuple(earlier or ())))
                continue
            if request is not None and getattr(validator, "wants_request", False):
                check_request = validator.check_request  # type: ignore[attr-defined]
                verdicts.append(check_request(completion, request))
                continue
            verdicts.append(validator.check(completion))
        except Exception as exc:  # one broken check must not hide the rest
            name = getattr(validator, "name", type(validator).__name__)
            verdicts.append(
                Verdict(name, False, f"{name}: raised {type(exc).__name__}: {_snip(str(exc))}")
            )
    return verdicts


def passed(verdicts: Sequence[Verdict]) -> bool:
    """True when nothing failed; no checks at all means nothing to escalate for."""
    return all(v.ok for v in verdicts)


def failure_reason(verdicts: Sequence[Verdict]) -> str:
    return "; ".join(v.reason or f"{v.validator}: failed" for v in verdicts if not v.ok)

