"""Replay mode: answer with what a real model really said, with its real token usage.

The simulator's own answers are made up, so savings measured on them only show that
the routing code works, not what it saves. In replay mode (``[simulator] replay =
"answers.jsonl"`` or ``batchroute sim --replay FILE``) a request whose messages match a
recorded query gets the recorded answer of the requested model and the recorded usage,
so the whole pipeline (routing, validators, escalation, pricing, reports) runs on real
outputs.

A request the file cannot answer is an error (404, naming the model and the prompt),
never an invented answer: a silent fallback would mix made-up quality into the figures.
``n`` returns the first n recorded samples, as an API returns n sampled choices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from batchroute.replay import ReplayIndex

_PREFIX = 60


@dataclass(frozen=True)
class ReplayAnswer:
    contents: tuple[str, ...]  # one per choice, in sample order
    prompt_tokens: int
    completion_tokens: int  # summed over the returned choices, as providers bill them


@dataclass(frozen=True)
class ReplayMiss:
    status: int
    message: str


def _prompt_prefix(messages: Sequence[dict[str, Any]]) -> str:
    users = [str(m.get("content", "")) for m in messages if m.get("role") == "user"]
    text = " ".join((users[-1] if users else str(messages[-1].get("content", ""))).split())
    return text if len(text) <= _PREFIX else text[: _PREFIX - 3] + "..."


def lookup(index: ReplayIndex, model: str, messages: Sequence[dict[str, Any]],
           n: int = 1) -> ReplayAnswer | ReplayMiss:
    """The recorded answer of ``model`` to ``messages``, or why there is none."""
    prompt = _prompt_prefix(messages) if messages else ""
    record = index.find(messages)
    if record is None:
        return ReplayMiss(404, f"replay: no recorded answer for model {model!r} to prompt "
                               f"{prompt!r}: the prompt is not in {index.source}")
    response = record.responses.get(model)
    if response is None:
        known = ", ".join(sorted(record.responses))
        return ReplayMiss(404, f"replay: model {model!r} has no recorded answer to prompt "
                               f"{prompt!r} (record {record.id!r}; recorded models: {known})")
    if n > len(response.samples):
        return ReplayMiss(400, f"replay: n={n} choices asked but model {model!r} has only "
                               f"{len(response.samples)} recorded sample(s) for prompt "
                               f"{prompt!r} (record {record.id!r})")
    prompt_tokens, completion_tokens = response.usage(n)
    return ReplayAnswer(contents=tuple(s.content for s in response.samples[:n]),
                        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
