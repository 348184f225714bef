"""The built-in checks that judge one completion's text: the escalation triggers.

Lenient about harmless formatting (quotes around a label, a ```json fence), strict
about anything a downstream consumer would choke on (prose around JSON, truncation).
Patterns and schemas are compiled by `batchroute.validators.safety`, never here.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from collections.abc import Callable
from typing import Any

from batchroute.completion import Completion
from batchroute.validators.base import _MESSAGE, Verdict, _Base, _json_path, _snip
from batchroute.validators.safety import (
    JsonTooDeep,
    Pattern,
    check_json_depth,
    schema_validator,
    text_may_be_deep,
)


class _NonEmpty(_Base):
    def check(self, completion: Completion) -> Verdict:
        if completion.content.strip():
            return self._ok()
        return self._fail("content is only whitespace" if completion.content else "empty content")


_TRUNCATED = {"length", "max_tokens"}
_FILTERED = {"content_filter", "safety"}


class _FinishReason(_Base):
    """A truncated or filtered answer can look fine at a glance yet be incomplete,
    so it is caught explicitly rather than left to the content checks."""

    def __init__(self, name: str, allowed: list[str]) -> None:
        super().__init__(name)
        self.allowed = allowed
        self._allowed = {a.lower() for a in allowed}

    def check(self, completion: Completion) -> Verdict:
        raw = completion.finish_reason
        reason = raw.lower()
        if reason in self._allowed:
            return self._ok()
        if reason in _TRUNCATED:
            return Verdict(self.name, False, f"truncated (finish_reason={raw})")
        if reason in _FILTERED:
            return Verdict(self.name, False, f"blocked by content filter (finish_reason={raw})")
        return self._fail(f"{raw!r} not in [{', '.join(self.allowed)}]")


_ANSWER_PREFIX = re.compile(
    r"^[*_]*(?:final\s+)?(?:answer|label)\s*[*_]*\s*[:：]\s*[*_]*\s*", re.IGNORECASE
)
_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "“": "”", "‘": "’", "*": "*", "_": "_"}
_TRAILING_PUNCT = ".,!"


def _normalise_label(text: str) -> str:
    """Strip the decoration cheap models wrap around a bare label.

    Repeated until stable because decorations nest: 'Answer: "Positive".'.
    Markdown emphasis counts as quoting since models bold labels unprompted.
    """
    previous = None
    while text != previous:
        previous = text
        text = text.strip()
        text = _ANSWER_PREFIX.sub("", text, count=1)
        text = text.rstrip(_TRAILING_PUNCT)
        if len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
            text = text[1:-1]
    return text


class _Choices(_Base):
    """Accepts only a bare label: a label inside a sentence is rejected, because
    guessing which word is the answer is exactly the judgement a stronger tier
    should make instead."""

    def __init__(self, name: str, choices: list[str], case_sensitive: bool) -> None:
        super().__init__(name)
        self.choices = choices
        self.case_sensitive = case_sensitive
        self._labels = {self._key(_normalise_label(c)) for c in choices}

    def _key(self, text: str) -> str:
        return text if self.case_sensitive else text.casefold()

    def check(self, completion: Completion) -> Verdict:
        answer = _normalise_label(completion.content)
        if self._key(answer) in self._labels:
            return self._ok()
        return self._fail(f"{_snip(answer)!r} not in [{', '.join(self.choices)}]")


_WHOLE_FENCE = re.compile(
    r"```[ \t]*(?:json)?[ \t]*\r?\n(?P<body>.*?)\r?\n?[ \t]*```", re.DOTALL | re.IGNORECASE
)


class _NonStandardJSON(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NonStandardJSON(name)


def _parse_json(content: str) -> tuple[Any, str]:
    """Parse the answer as JSON, returning (value, error).

    A fence that wraps the whole answer is stripped since it is pure formatting,
    but prose around JSON is an error: a consumer reading the output file would
    have to guess where the JSON starts. NaN/Infinity are rejected because other
    JSON parsers refuse them.
    """
    text = content.strip()
    fenced = _WHOLE_FENCE.fullmatch(text)
    if fenced:
        text = fenced.group("body")
    if not text.strip():
        return None, "empty content"
    try:
        value = json.loads(text, parse_constant=_reject_constant)
        if text_may_be_deep(text):
            check_json_depth(value)
        return value, ""
    except (RecursionError, JsonTooDeep):
        return None, "invalid JSON: nested too deeply"
    except json.JSONDecodeError as exc:
        near = _snip(exc.doc[exc.pos : exc.pos + 20], 20)
        where = f"line {exc.lineno} column {exc.colno}"
        return None, f"invalid JSON: {exc.msg} at {where} near {near!r}"
    except _NonStandardJSON as exc:
        return None, f"invalid JSON: non-standard constant {exc}"


class _Json(_Base):
    def check(self, completion: Completion) -> Verdict:
        _, error = _parse_json(completion.content)
        return self._fail(error) if error else self._ok()



class _JsonSchema(_Base):
    def __init__(self, name: str, schema: dict[str, Any]) -> None:
        super().__init__(name)
        self.schema = schema
        # Never retrieves: a $ref outside the schema is Unresolvable (see safety).
        self._validator = schema_validator(schema)

    def check(self, completion: Completion) -> Verdict:
        # Loaded already by schema_validator (imported here, not at start-up: see safety).
        import jsonschema.exceptions
        import referencing.exceptions

        instance, error = _parse_json(completion.content)
        if error:
            return self._fail(error)
        try:
            errors = list(self._validator.iter_errors(instance))
        except referencing.exceptions.Unresolvable as exc:
            # Remote $refs are never fetched (no I/O here), so such a schema cannot be
            # checked; failing loudly beats passing answers nobody validated.
            return self._fail(f"schema $ref cannot be resolved: {_snip(str(exc), _MESSAGE)}")
        except RecursionError:
            return self._fail("schema and answer nest too deeply to check")
        if not errors:
            return self._ok()
        best = jsonschema.exceptions.best_match(errors)
        assert best is not None  # errors is non-empty
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        where = _json_path(best.absolute_path)
        return self._fail(f"{where}: {_snip(best.message, _MESSAGE)}{more}")


class _Regex(_Base):
    """The pattern is compiled on RE2 (safety.compile_pattern): linear in the answer's
    length whatever the pattern, so a job line cannot freeze a worker."""

    def __init__(self, name: str, pattern: Pattern, mode: str) -> None:
        super().__init__(name)
        self.pattern = pattern
        self.mode = mode

    def check(self, completion: Completion) -> Verdict:
        if self.mode == "fullmatch":
            # Surrounding whitespace is stripped: a trailing newline is not a
            # reason to pay for a better model.
            matched = self.pattern.fullmatch(completion.content.strip())
            what = "does not fully match"
        else:
            matched = self.pattern.search(completion.content)
            what = "no match for"
        if matched:
            return self._ok()
        return self._fail(f"{what} /{_snip(self.pattern.pattern)}/")


def _count(content: str, unit: str) -> int:
    text = content.strip()
    return len(text) if unit == "chars" else len(text.split())


class _Length(_Base):
    """Score is actual/limit so callers can tell a near miss from a runaway answer;
    with several limits the most violated one wins."""

    def __init__(self, name: str, limits: dict[str, int], upper: bool) -> None:
        super().__init__(name)
        self.limits = limits
        self.upper = upper

    def check(self, completion: Completion) -> Verdict:
        ratios: list[float] = []
        problems: list[str] = []
        for unit, limit in self.limits.items():
            actual = _count(completion.content, unit)
            ratios.append(actual / limit)
            if self.upper and actual > limit:
                problems.append(f"{actual} {unit} > {limit}")
            elif not self.upper and actual < limit:
                problems.append(f"{actual} {unit} < {limit}")
        score = max(ratios) if self.upper else min(ratios)
        if problems:
            return self._fail(", ".join(problems), score)
        return self._ok(score)


_FENCE_LINE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*$")
_PYTHON_TAGS = {"python", "python3", "py", "py3"}


def _extract_python(content: str) -> tuple[str, bool]:
    """Return (code, fence_closed): the first Python-tagged fenced block, else the
    first untagged one, else the whole content.

    An unclosed fence is kept rather than ignored because it is the usual sign of
    a truncated answer, and the syntax error it yields says so.
    """
    blocks: list[tuple[str, str, bool]] = []
    lines = content.splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE_LINE.match(lines[i])
        if not opening:
            i += 1
            continue
        tag = opening.group(1).lower()
        body: list[str] = []
        i += 1
        closed = False
        while i < len(lines):
            if lines[i].strip() == "```":
                closed = True
                break
            body.append(lines[i])
            i += 1
        blocks.append((tag, "\n".join(body), closed))
        i += 1
    for wanted in (_PYTHON_TAGS, {""}):
        for tag, code, closed in blocks:
            if tag in wanted:
                return code, closed
    return content, True


def _call_result(label: str, result: Any) -> tuple[bool, str]:
    """Accept the (ok, reason) shapes callables naturally return."""
    if isinstance(result, bool):
        return result, ""
    if (
        isinstance(result, tuple)
        and len(result) == 2
        and isinstance(result[0], bool)
        and isinstance(result[1], str)
    ):
        return result[0], result[1]
    raise TypeError(f"{label} returned {type(result).__name__}, expected bool or (bool, reason)")


class _PythonSyntax(_Base):
    """Only parses, never executes: running model-written code is the named test's
    business, under whatever sandbox its owner chose."""

    def __init__(self, name: str, test_name: str | None, test: Callable[[str], Any] | None) -> None:
        super().__init__(name)
        self.test_name = test_name
        self._test = test

    def check(self, completion: Completion) -> Verdict:
        code, closed = _extract_python(completion.content)
        if not code.strip():
            return self._fail("no code")
        try:
            with warnings.catch_warnings():
                # Invalid escapes etc. warn at parse time; under -W error they would
                # turn into SyntaxErrors and fail code that is valid.
                warnings.simplefilter("ignore")
                ast.parse(code)
        except SyntaxError as exc:
            hint = " (code fence not closed: output truncated?)" if not closed else ""
            return self._fail(f"line {exc.lineno}: {exc.msg}{hint}")
        except (ValueError, RecursionError, MemoryError) as exc:
            return self._fail(f"cannot parse: {_snip(str(exc) or type(exc).__name__)}")
        if self._test is None:
            return self._ok()
        label = f"test {self.test_name!r}"
        try:
            ok, why = _call_result(label, self._test(code))
        except Exception as exc:  # a broken test must not kill the batch
            return self._fail(f"{label} raised {type(exc).__name__}: {_snip(str(exc))}")
        return self._ok() if ok else self._fail(f"{label} failed" + (f": {why}" if why else ""))


class _LogprobConfidence(_Base):
    def __init__(self, name: str, threshold: float, missing_ok: bool) -> None:
        super().__init__(name)
        self.threshold = threshold
        self.missing_ok = missing_ok

    def check(self, completion: Completion) -> Verdict:
        if not completion.logprobs:
            if self.missing_ok:
                return self._ok(reason="no logprobs returned; skipped")
            return Verdict(self.name, False, "no logprobs returned")
        mean = sum(completion.logprobs) / len(completion.logprobs)
        if mean >= self.threshold:
            return self._ok(mean)
        return self._fail(f"mean logprob {mean:.3f} < {self.threshold:g}", mean)
