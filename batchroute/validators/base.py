"""The shared vocabulary of every check: a Verdict, the error a bad spec raises, the
Validator protocol, and the plumbing that makes every reason name its check."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from batchroute.completion import Completion


@dataclass(frozen=True)
class Verdict:
    """One check's judgement, kept per check so the ledger can say what failed."""

    validator: str
    ok: bool
    reason: str = ""
    score: float | None = None


class ValidatorError(ValueError):
    """A spec that can never be checked; raised early so a bad job line is rejected at
    ingestion instead of silently escalating (or passing) every request."""


class Validator(Protocol):
    """Anything the pipeline can run against a completion, built-in or not."""

    name: str

    def check(self, completion: Completion) -> Verdict: ...


# Longest snippet of model output or pattern quoted in a reason: reasons end up in
# logs and escalation records, where a whole answer would drown the actual problem.
_SNIPPET = 40
_MESSAGE = 160


def _snip(text: str, limit: int = _SNIPPET) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Base:
    """Shared verdict plumbing so every reason starts with the check that produced it."""

    name: str

    def __init__(self, name: str) -> None:
        self.name = name

    def _ok(self, score: float | None = None, reason: str = "") -> Verdict:
        return Verdict(self.name, True, reason, score)

    def _fail(self, reason: str, score: float | None = None) -> Verdict:
        return Verdict(self.name, False, f"{self.name}: {reason}", score)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def _json_path(path: Sequence[Any]) -> str:
    out = "$"
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier():
            out += f".{part}"
        else:
            out += f"[{json.dumps(part)}]"
    return out
