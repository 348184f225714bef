"""Consensus of sampled answers: accept a cheap model's answer when its samples agree.

The idea of "LLM cascades with Mixture of Thought" (Yue et al., ICLR 2024): ask the
cheap model for k samples of the same request (OpenAI ``n = k``: one call, the prompt
billed once); when at least ``min_agree`` of them give the same (normalised) answer the
cheap answer is kept, otherwise the job escalates. Agreement is a confidence signal
that needs no reference answer and no logprobs, and on reasoning tasks it is a good
one: a model that is unsure scatters its samples.

This module holds the pure parts the pipeline, the ``consensus`` validator and
``batchroute calibrate`` share, so the three can never count votes differently:

* :func:`with_samples` - the request body asking for k choices;
* :func:`tally` - normalise and count the answers;
* :func:`majority_first` - put a sample that gives the majority answer first, because
  the first choice is what the output file and every other check treat as *the* answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from batchroute.completion import Completion

CONSENSUS = "consensus"

_PREFIX = re.compile(
    r"^[*_]*(?:the\s+)?(?:final\s+)?(?:answer|label)\b(?:\s+is\b)?\s*[*_]*\s*[:：]?\s*[*_]*\s*",
    re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "`": "`", "“": "”", "‘": "’", "*": "*", "_": "_", "(": ")"}
_TRAILING = ".,!;"


@dataclass(frozen=True)
class Tally:
    """The vote over the samples: the winning answer, its votes, where it first appears."""

    answer: str  # normalised; "" when no sample gave an answer
    votes: int
    index: int  # first sample giving `answer` (0 when there is none)
    samples: int  # samples counted
    distinct: int  # distinct non-empty answers


def _compile(pattern: str | None, case_sensitive: bool) -> Any:
    """The `extract` pattern comes from a job line: compiled on RE2, linear-time
    (batchroute.validators.safety), imported here late since the validators import us."""
    if pattern is None:
        return None
    from batchroute.validators.safety import cached_pattern

    return cached_pattern(pattern, case_sensitive)


def answer_key(text: str, extract: str | None = None, case_sensitive: bool = False) -> str:
    """The normalised answer of one sample; "" means "no answer" (it casts no vote).

    With ``extract`` (a regex), the answer is its *last* match in the text (group 1 if
    the pattern has a group): reasoning comes first and the final answer last. Without
    it, decoration models add around a bare answer is stripped ("Answer: **B**." -> "b").
    """
    pattern = _compile(extract, case_sensitive)
    if pattern is not None:
        matches = list(pattern.finditer(text))
        if not matches:
            return ""
        last = matches[-1]
        text = last.group(1) if pattern.groups else last.group(0)
        text = text or ""
    previous = None
    while text != previous:
        previous = text
        text = " ".join(text.split())
        text = _PREFIX.sub("", text, count=1)
        text = text.rstrip(_TRAILING).strip("*_ ")  # markdown emphasis around the answer
        if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
            text = text[1:-1]
    return text if case_sensitive else text.casefold()


def tally(samples: Sequence[str], extract: str | None = None,
          case_sensitive: bool = False) -> Tally:
    """Count normalised answers; ties go to the answer that appears first."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, text in enumerate(samples):
        key = answer_key(text, extract, case_sensitive)
        if not key:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return Tally("", 0, 0, len(samples), 0)
    best = max(counts, key=lambda k: (counts[k], -first[k]))
    return Tally(best, counts[best], first[best], len(samples), len(counts))


def consensus_specs(specs: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [s for s in specs if isinstance(s, Mapping) and s.get("type") == CONSENSUS]


def samples_wanted(specs: Iterable[Mapping[str, Any]]) -> int:
    """How many choices a request must ask for so every consensus check can run."""
    return max((int(s.get("k", 1)) for s in consensus_specs(specs)), default=1)


def with_samples(body: dict[str, Any], specs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The request body with ``n`` raised to the largest consensus ``k`` (never lowered)."""
    k = samples_wanted(specs)
    n = body.get("n")
    if k <= 1 or (isinstance(n, int) and not isinstance(n, bool) and n >= k):
        return body
    return {**body, "n": k}


def samples_of(completion: Completion) -> list[str]:
    return [completion.content, *completion.alternatives]


def majority_first(completion: Completion, specs: Iterable[Mapping[str, Any]]) -> Completion:
    """Reorder the choices so the first one gives the majority answer of the first k.

    Returns the completion unchanged when no consensus check applies or the first choice
    already agrees with the majority. The response body is reordered the same way (and
    re-indexed), so the output file's first choice is the answer that was accepted.
    """
    specs = consensus_specs(specs)
    if not specs or not completion.alternatives:
        return completion
    spec = max(specs, key=lambda s: int(s.get("k", 1)))
    k = int(spec.get("k", 1))
    samples = samples_of(completion)[:k]
    t = tally(samples, spec.get("extract"), bool(spec.get("case_sensitive", False)))
    if t.index == 0:
        return completion
    order = [t.index, *[i for i in range(len(samples_of(completion))) if i != t.index]]
    everything = samples_of(completion)
    body = dict(completion.body)
    choices = body.get("choices")
    finish = completion.finish_reason
    if isinstance(choices, list) and len(choices) == len(everything):
        moved = [dict(choices[i]) for i in order]
        for new_index, choice in enumerate(moved):
            choice["index"] = new_index
        body["choices"] = moved
        finish = str(moved[0].get("finish_reason") or finish)
    return replace(completion, content=everything[order[0]],
                   alternatives=tuple(everything[i] for i in order[1:]),
                   finish_reason=finish, logprobs=None, body=body)
