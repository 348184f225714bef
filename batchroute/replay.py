"""The replay dataset format: recorded answers of real models to real queries.

One JSON object a line (see DESIGN.md, "Replay dataset")::

    {"id": "q1", "task": "classify", "messages": [{"role": "user", "content": "..."}],
     "reference": "No",
     "responses": {"gpt-4": {"content": "No", "prompt_tokens": 297, "completion_tokens": 1,
                             "correct": true}}}

Extension for models sampled several times (MoT: 20 GPT-3.5 samples a question): a
response may carry ``"samples": [{"content", "completion_tokens", "correct"}, ...]``
listing *every* sample, the first one being what a plain (``n = 1``) call returns; the
top-level ``content``/``completion_tokens``/``correct`` then repeat ``samples[0]``.

Three readers share this module so they can never disagree about what a record means:
the simulator's replay mode (what to answer), ``batchroute calibrate`` (what each policy
would have cost and got right) and the replay benchmark (was the final answer correct).
Messages are matched on their normalised text (role + plain-text content), the same
normalisation the simulator applies to every request, so a prompt sent as content parts
or through the Anthropic endpoint still finds its record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchroute.tokens import message_text


class ReplayFormatError(ValueError):
    """A replay file line is unusable; the message names the line and the field."""


@dataclass(frozen=True)
class Sample:
    """One recorded completion."""

    content: str
    completion_tokens: int
    correct: bool | None = None


@dataclass(frozen=True)
class Response:
    """What one model answered to one query, possibly sampled several times."""

    prompt_tokens: int
    samples: tuple[Sample, ...]

    @property
    def content(self) -> str:
        return self.samples[0].content

    @property
    def correct(self) -> bool | None:
        return self.samples[0].correct

    @property
    def completion_tokens(self) -> int:
        return self.samples[0].completion_tokens

    def usage(self, n: int = 1) -> tuple[int, int]:
        """(prompt, completion) tokens of a call asking for ``n`` choices.

        Providers bill the prompt once and every returned choice's tokens, so that is
        what the simulator reports and what calibration prices.
        """
        if n > len(self.samples):
            raise ValueError(f"{n} samples asked, {len(self.samples)} recorded")
        return self.prompt_tokens, sum(s.completion_tokens for s in self.samples[:n])


@dataclass(frozen=True)
class Record:
    id: str
    task: str
    messages: list[dict[str, str]]
    responses: dict[str, Response]
    reference: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # The model the query asked for (a batch line's body.model): calibration's default
    # reference model, the one accuracy and savings are held against.
    model: str | None = None

    @property
    def key(self) -> str:
        return prompt_key(self.messages)

    def label_of(self, model: str, content: str) -> bool | None:
        """Whether ``content``, answered by ``model``, was correct: the label of the
        recorded sample with exactly that text (None when it was never recorded)."""
        response = self.responses.get(model)
        for sample in response.samples if response is not None else ():
            if sample.content == content:
                return sample.correct
        return None


def normalise_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    """Role and plain text only: what a provider's answer depends on, for matching."""
    out = []
    for m in messages:
        if isinstance(m, dict):
            out.append({"role": str(m.get("role", "")), "content": message_text(m.get("content"))})
    return out


def prompt_key(messages: Sequence[Any]) -> str:
    return json.dumps(normalise_messages(messages), sort_keys=True, ensure_ascii=False,
                      separators=(",", ":"))


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReplayFormatError(f"{where}: expected a non-negative integer, got {value!r}")
    return value


def _correct(value: Any, where: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise ReplayFormatError(f"{where}: expected true, false or null, got {value!r}")


def _sample(d: Any, where: str) -> Sample:
    if not isinstance(d, dict) or not isinstance(d.get("content", ""), str):
        raise ReplayFormatError(f"{where}: expected an object with a string 'content'")
    return Sample(content=d.get("content", ""),
                  completion_tokens=_int(d.get("completion_tokens", 0),
                                         f"{where}.completion_tokens"),
                  correct=_correct(d.get("correct"), f"{where}.correct"))


def _response(d: Any, where: str) -> Response:
    if not isinstance(d, dict):
        raise ReplayFormatError(f"{where}: expected an object")
    prompt = _int(d.get("prompt_tokens", 0), f"{where}.prompt_tokens")
    raw = d.get("samples")
    if raw is None:
        samples: tuple[Sample, ...] = (_sample(d, where),)
    else:
        if not isinstance(raw, list) or not raw:
            raise ReplayFormatError(f"{where}.samples: expected a non-empty list")
        samples = tuple(_sample(s, f"{where}.samples[{i}]") for i, s in enumerate(raw))
    return Response(prompt_tokens=prompt, samples=samples)


def parse_record(obj: Any, where: str = "record") -> Record:
    if not isinstance(obj, dict):
        raise ReplayFormatError(f"{where}: expected a JSON object")
    rid = obj.get("id")
    if not isinstance(rid, str | int) or isinstance(rid, bool) or str(rid) == "":
        raise ReplayFormatError(f"{where}.id: required, a string")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ReplayFormatError(f"{where}.messages: expected a non-empty list of messages")
    responses = obj.get("responses")
    if not isinstance(responses, dict) or not responses:
        raise ReplayFormatError(f"{where}.responses: expected an object of model -> response")
    reference = obj.get("reference")
    task = obj.get("task", "default")
    if not isinstance(task, str) or not task:
        raise ReplayFormatError(f"{where}.task: expected a non-empty string")
    asked = obj.get("model")
    if asked is not None and (not isinstance(asked, str) or not asked):
        raise ReplayFormatError(f"{where}.model: expected the requested model's name")
    return Record(
        id=str(rid), task=task, messages=normalise_messages(messages),
        responses={str(m): _response(r, f"{where}.responses.{m}") for m, r in responses.items()},
        reference=None if reference is None else str(reference),
        metadata=dict(obj.get("metadata") or {}),
        model=None if asked in (None, "auto") else asked,
    )


def iter_records(path: str | Path) -> Iterator[Record]:
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReplayFormatError(f"{path}:{n}: invalid JSON: {e.msg}") from None
            yield parse_record(obj, f"{path}:{n}")


def load_records(path: str | Path) -> list[Record]:
    return list(iter_records(path))


def record_json(record: Record) -> dict[str, Any]:
    """The JSON form of a record (the inverse of parse_record)."""
    responses: dict[str, Any] = {}
    for model, r in record.responses.items():
        first = r.samples[0]
        d: dict[str, Any] = {"content": first.content, "prompt_tokens": r.prompt_tokens,
                             "completion_tokens": first.completion_tokens,
                             "correct": first.correct}
        if len(r.samples) > 1:
            d["samples"] = [{"content": s.content, "completion_tokens": s.completion_tokens,
                             "correct": s.correct} for s in r.samples]
        responses[model] = d
    out: dict[str, Any] = {"id": record.id, "task": record.task, "messages": record.messages,
                           "reference": record.reference, "responses": responses}
    if record.metadata:
        out["metadata"] = record.metadata
    if record.model:
        out["model"] = record.model
    return out


def write_records(path: str | Path, records: Iterable[Record]) -> int:
    n = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(record_json(r), ensure_ascii=False) + "\n")
            n += 1
    return n


class ReplayIndex:
    """Recorded answers by prompt, for the simulator: O(1) lookup per request.

    A prompt recorded twice keeps its first record: two different answers to one prompt
    would make the replay depend on file order, so converters deduplicate up front.
    """

    def __init__(self, records: Iterable[Record], source: str = "<records>") -> None:
        self.source = source
        self._by_key: dict[str, Record] = {}
        self.duplicates = 0
        for r in records:
            if r.key in self._by_key:
                self.duplicates += 1
                continue
            self._by_key[r.key] = r

    @classmethod
    def load(cls, path: str | Path) -> ReplayIndex:
        return cls(iter_records(path), str(path))

    def __len__(self) -> int:
        return len(self._by_key)

    def find(self, messages: Sequence[Any]) -> Record | None:
        return self._by_key.get(prompt_key(messages))

    def models(self) -> set[str]:
        return {m for r in self._by_key.values() for m in r.responses}
