"""Quality checks that decide whether a cheap-tier answer is good enough to keep.

A failed check is what triggers escalation to a more expensive tier, so every
check here is a trade-off between catching bad answers and paying for needless
escalations. That is why the checks are lenient about harmless formatting
(quotes around a label, a ```json fence) but strict about anything a downstream
consumer would choke on (prose around JSON, truncated output).

Specs arrive in job input, which is untrusted: nothing in a spec can name code
to import. Custom checks are looked up by name in an operator-supplied mapping.

Every check judges one completion. The `consensus` check reads all the choices
of that completion (the pipeline asks for ``n = k`` of them, see
`batchroute.consensus`). The `scorer` check also reads the request (its last user
message): a learned P(answer correct | prompt, answer) that `batchroute calibrate`
fits and writes as a JSON weight file (`batchroute.scorer`). Any spec may carry
``"tiers": [1, 2]`` to run only on attempts at those tiers (see `specs_for_tier`): a
check whose only effect is to escalate is pointless, and costly, at the top of a ladder.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import json
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import jsonschema
import jsonschema.exceptions
import referencing.exceptions

from batchroute import consensus
from batchroute.completion import Completion

__all__ = [
    "PIPELINE_TYPES",
    "VALIDATOR_TYPES",
    "Validator",
    "ValidatorError",
    "Verdict",
    "build_validators",
    "failure_reason",
    "passed",
    "run_validators",
    "specs_for_tier",
    "validate_specs",
    "validators_for_response_format",
]


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


# --------------------------------------------------------------------------- specs


_MISSING: Any = object()


class _Params:
    """Reads one spec's parameters with errors that name the spec and the field, so
    whoever wrote the job line can fix it without reading this module."""

    def __init__(self, spec: Mapping[str, Any], ctx: str) -> None:
        self._spec = spec
        self.ctx = ctx
        self._used: set[str] = {"type"}

    def error(self, message: str) -> ValidatorError:
        return ValidatorError(f"{self.ctx}: {message}")

    def has(self, key: str) -> bool:
        self._used.add(key)
        return key in self._spec

    def raw(self, key: str) -> Any:
        self._used.add(key)
        return self._spec.get(key, _MISSING)

    def string(self, key: str, default: str | None = None) -> str:
        value = self.raw(key)
        if value is _MISSING and default is not None:
            return default
        if not isinstance(value, str) or not value:
            raise self.error(f"{key!r} must be a non-empty string")
        return value

    def str_list(self, key: str, default: list[str] | None = None) -> list[str]:
        value = self.raw(key)
        if value is _MISSING and default is not None:
            return list(default)
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(item, str) and item for item in value)
        ):
            raise self.error(f"{key!r} must be a non-empty list of strings")
        return list(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise self.error(f"{key!r} must be true or false")
        return value

    def number(self, key: str) -> float:
        value = self.raw(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise self.error(f"{key!r} must be a number")
        return float(value)

    def positive_int(self, key: str) -> int | None:
        value = self.raw(key)
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.error(f"{key!r} must be a positive integer")
        return value

    def rest(self) -> dict[str, Any]:
        """Everything not yet read: the pass-through parameters of a custom check."""
        extra = {k: v for k, v in self._spec.items() if k not in self._used}
        self._used.update(extra)
        return extra

    def reject_unknown(self, known: frozenset[str]) -> None:
        """Checked before any parameter is read, so a typo ("choice" for "choices")
        is reported as the typo rather than as the missing parameter."""
        unknown = sorted(str(k) for k in self._spec if k != "type" and k not in known)
        if unknown:
            expected = ", ".join(sorted(known)) or "none"
            raise self.error(f"unknown parameter {unknown[0]!r} (expected: {expected})")


def _resolve_callable(p: _Params, field: str, name: str, custom: Mapping[str, str]) -> Any:
    """Look `name` up in the operator's mapping and import it.

    Only the mapping's values are ever imported: a spec comes from job input, and
    letting it name a module would let any job line run arbitrary code on workers.
    """
    path = custom.get(name)
    if path is None:
        hint = ""
        if "." in name or ":" in name:
            hint = "; dotted paths are not accepted in specs, register it in the custom mapping"
        known = ", ".join(sorted(custom)) or "none registered"
        raise p.error(f"{field!r} {name!r} is not a known custom validator (known: {known}){hint}")
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise p.error(f"custom validator {name!r} has a malformed path {path!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for attr in attr_path.split("."):
            target = getattr(target, attr)
    except Exception as exc:  # importing runs module code, which can fail any way it likes
        raise p.error(f"cannot load custom validator {name!r} from {path!r}: {exc}") from exc
    if not callable(target):
        raise p.error(f"custom validator {name!r} ({path!r}) is not callable")
    return target


def _check_signature(p: _Params, func: Any, label: str, *args: Any, **kwargs: Any) -> None:
    """Catch parameters the callable cannot take at ingestion, not on every completion."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # some builtins have no introspectable signature
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise p.error(f"parameters do not fit {label}: {exc}") from exc


# ---------------------------------------------------------------------- validators


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
        return json.loads(text, parse_constant=_reject_constant), ""
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


class _JsonSchema(_Base):
    def __init__(self, name: str, schema: dict[str, Any]) -> None:
        super().__init__(name)
        self.schema = schema
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        # Formats are asserted (not just annotated) because "date": "yesterday" is
        # precisely the kind of sloppy answer that should escalate.
        self._validator = cls(schema, format_checker=cls.FORMAT_CHECKER)

    def check(self, completion: Completion) -> Verdict:
        instance, error = _parse_json(completion.content)
        if error:
            return self._fail(error)
        try:
            errors = list(self._validator.iter_errors(instance))
        except referencing.exceptions.Unresolvable as exc:
            # Remote $refs are never fetched (no I/O here), so such a schema cannot be
            # checked; failing loudly beats passing answers nobody validated.
            return self._fail(f"schema $ref cannot be resolved: {_snip(str(exc), _MESSAGE)}")
        if not errors:
            return self._ok()
        best = jsonschema.exceptions.best_match(errors)
        assert best is not None  # errors is non-empty
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        where = _json_path(best.absolute_path)
        return self._fail(f"{where}: {_snip(best.message, _MESSAGE)}{more}")


_REGEX_FLAGS = {
    "i": re.IGNORECASE,
    "m": re.MULTILINE,
    "s": re.DOTALL,
    "x": re.VERBOSE,
    "a": re.ASCII,
}


class _Regex(_Base):
    def __init__(self, name: str, pattern: re.Pattern[str], mode: str) -> None:
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


# ------------------------------------------------------------------------ builders


# None means "custom mapping not known yet": see validate_specs.
_Mapping = Mapping[str, str] | None
_Factory = Callable[[str, _Params, _Mapping], Validator]


def _make_non_empty(name: str, p: _Params, custom: _Mapping) -> Validator:
    return _NonEmpty(name)


def _make_finish_reason(name: str, p: _Params, custom: _Mapping) -> Validator:
    return _FinishReason(name, p.str_list("allowed", ["stop", "end_turn", "tool_calls"]))


def _make_choices(name: str, p: _Params, custom: _Mapping) -> Validator:
    choices = p.str_list("choices")
    if any(not _normalise_label(c) for c in choices):
        raise p.error("'choices' must not contain labels that are only quotes or punctuation")
    return _Choices(name, choices, p.flag("case_sensitive", False))


def _make_json(name: str, p: _Params, custom: _Mapping) -> Validator:
    return _Json(name)


def _make_json_schema(name: str, p: _Params, custom: _Mapping) -> Validator:
    schema = p.raw("schema")
    if not isinstance(schema, dict):
        raise p.error("'schema' must be a JSON Schema object")
    try:
        key = json.dumps(schema, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):  # not plain JSON (e.g. a TOML date): check it uncached
        problem = _schema_problem_uncached(schema)
    else:
        problem = _schema_problem(key)
    if problem is not None:
        raise p.error(f"'schema' is not a valid JSON Schema: {problem}")
    return _JsonSchema(name, schema)


@functools.lru_cache(maxsize=512)
def _schema_problem(canonical: str) -> str | None:
    """check_schema walks the whole meta-schema (~20 ms) and a batch repeats one schema on
    thousands of lines (and every attempt rebuilds its validators): check each distinct
    schema once per process. Keyed by the canonical JSON text, so equal schemas hit."""
    return _schema_problem_uncached(json.loads(canonical))


def _schema_problem_uncached(schema: dict[str, Any]) -> str | None:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        return f"{_json_path(exc.absolute_path)}: {_snip(exc.message, _MESSAGE)}"
    return None


def _make_regex(name: str, p: _Params, custom: _Mapping) -> Validator:
    pattern = p.string("pattern")
    flags_spec = p.raw("flags")
    if flags_spec is _MISSING:
        flags_spec = ""
    if not isinstance(flags_spec, str):
        raise p.error("'flags' must be a string of letters, e.g. \"im\"")
    flags = 0
    for letter in flags_spec:
        if letter not in _REGEX_FLAGS:
            known = "".join(_REGEX_FLAGS)
            raise p.error(f"'flags' has unknown flag {letter!r} (use any of {known!r})")
        flags |= _REGEX_FLAGS[letter]
    mode = p.string("mode", default="search")
    if mode not in ("search", "fullmatch"):
        raise p.error(f"'mode' must be 'search' or 'fullmatch', got {mode!r}")
    try:
        compiled = re.compile(pattern, flags)
    except re.error as exc:
        raise p.error(f"'pattern' is not a valid regular expression: {exc}") from exc
    return _Regex(name, compiled, mode)


def _length_factory(upper: bool) -> _Factory:
    prefix = "max" if upper else "min"

    def make(name: str, p: _Params, custom: _Mapping) -> Validator:
        limits: dict[str, int] = {}
        for unit in ("chars", "words"):
            value = p.positive_int(f"{prefix}_{unit}")
            if value is not None:
                limits[unit] = value
        if not limits:
            raise p.error(f"needs '{prefix}_chars' and/or '{prefix}_words'")
        return _Length(name, limits, upper)

    return make


def _make_python_syntax(name: str, p: _Params, custom: _Mapping) -> Validator:
    test_name: str | None = None
    test = None
    if p.has("test"):
        test_name = p.string("test")
        if custom is not None:
            test = _resolve_callable(p, "test", test_name, custom)
            _check_signature(p, test, f"test {test_name!r}", "")
    return _PythonSyntax(name, test_name, test)


def _make_logprob_confidence(name: str, p: _Params, custom: _Mapping) -> Validator:
    threshold = p.number("threshold")
    if threshold > 0:
        # Log-probabilities are never positive; 0.8 almost always means someone
        # meant a probability, and would escalate every single job.
        raise p.error("'threshold' is a mean token log-probability and must be <= 0, e.g. -0.5")
    return _LogprobConfidence(name, threshold, p.flag("missing_ok", False))


def _make_consensus(name: str, p: _Params, custom: _Mapping) -> Validator:
    k = p.positive_int("k")
    if k is None or k < 2:
        raise p.error("'k' (samples to compare) must be an integer >= 2")
    min_agree = p.positive_int("min_agree")
    if min_agree is None:
        min_agree = k // 2 + 1
    if min_agree > k:
        raise p.error(f"'min_agree' ({min_agree}) cannot exceed 'k' ({k})")
    extract = None
    if p.has("extract"):
        extract = p.string("extract")
        try:
            compiled = re.compile(extract)
        except re.error as exc:
            raise p.error(f"'extract' is not a valid regular expression: {exc}") from exc
        if compiled.groups > 1:
            raise p.error("'extract' may have at most one group (the answer)")
    return _Consensus(name, k, min_agree, extract, p.flag("case_sensitive", False))


def _make_scorer(name: str, p: _Params, custom: _Mapping) -> Validator:
    from batchroute import scorer

    threshold = p.number("threshold")
    if not 0.0 <= threshold <= 1.0:
        raise p.error("'threshold' is a probability (P(answer correct)) in [0, 1]")
    if p.has("model") == p.has("model_file"):
        raise p.error("give exactly one of 'model_file' (a JSON file written by "
                      "`batchroute calibrate`) or 'model' (the same JSON inline)")
    try:
        if p.has("model_file"):
            path = p.string("model_file")
            model = scorer.load(path)
            label = path.rsplit("/", 1)[-1]
        else:
            model = scorer.Scorer.from_dict(p.raw("model"), "'model'")
            label = "inline"
    except scorer.ScorerError as e:
        raise p.error(str(e)) from None
    return _ScorerCheck(name, model, threshold, label)


def _make_custom(name: str, p: _Params, custom: _Mapping) -> Validator:
    custom_name = p.string("name") if name == "custom" else name
    params = p.rest()
    if custom is None:
        return _Unresolved(name, custom_name)
    func = _resolve_callable(p, "name", custom_name, custom)
    _check_signature(p, func, f"custom validator {custom_name!r}", None, **params)
    return _Custom(name, custom_name, func, params)


_BUILTINS: dict[str, _Factory] = {
    "non_empty": _make_non_empty,
    "finish_reason": _make_finish_reason,
    "choices": _make_choices,
    "json": _make_json,
    "json_schema": _make_json_schema,
    "regex": _make_regex,
    "max_length": _length_factory(upper=True),
    "min_length": _length_factory(upper=False),
    "python_syntax": _make_python_syntax,
    "logprob_confidence": _make_logprob_confidence,
    "consensus": _make_consensus,
    "scorer": _make_scorer,
    "custom": _make_custom,
}

# Unknown parameters are errors because a misspelt one silently disables a check.
# Custom validators are absent: their extra keys are passed to the callable.
_KNOWN_PARAMS: dict[str, frozenset[str]] = {
    "non_empty": frozenset(),
    "finish_reason": frozenset({"allowed"}),
    "choices": frozenset({"choices", "case_sensitive"}),
    "json": frozenset(),
    "json_schema": frozenset({"schema"}),
    "regex": frozenset({"pattern", "flags", "mode"}),
    "max_length": frozenset({"max_chars", "max_words"}),
    "min_length": frozenset({"min_chars", "min_words"}),
    "python_syntax": frozenset({"test"}),
    "logprob_confidence": frozenset({"threshold", "missing_ok"}),
    "consensus": frozenset({"k", "min_agree", "extract", "case_sensitive"}),
    "scorer": frozenset({"threshold", "model_file", "model"}),
}

#: Spec types this module builds (custom names registered by the operator come on top).
VALIDATOR_TYPES = frozenset(_BUILTINS)

#: Spec types that cannot be built here. Empty since `consensus` reads the choices of
#: one completion; kept because callers import it.
PIPELINE_TYPES: frozenset[str] = frozenset()


def _tiers(value: Any, where: str) -> list[int]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1
                       for t in value)):
        raise ValidatorError(f"{where}: 'tiers' must be a non-empty list of tiers (integers >= 1)")
    return list(value)


def specs_for_tier(specs: Sequence[Mapping[str, Any]], tier: int) -> list[dict[str, Any]]:
    """The specs that apply to an attempt at `tier`, without their "tiers" key.

    Specs without "tiers" apply everywhere. Calibrated configs use it to run a check
    (e.g. consensus, which multiplies the completion tokens by k) only on the cheap
    tiers whose answers it decides to keep or escalate.
    """
    out: list[dict[str, Any]] = []
    for spec in specs:
        tiers = spec.get("tiers") if isinstance(spec, Mapping) else None
        if tiers is None:
            out.append(dict(spec))
        elif isinstance(tiers, list) and tier in tiers:
            out.append({k: v for k, v in spec.items() if k != "tiers"})
    return out


def _build_one(index: int, spec: Any, custom: _Mapping) -> Validator:
    where = f"validators[{index}]"
    if not isinstance(spec, Mapping):
        raise ValidatorError(f"{where}: must be an object with a 'type', got {type(spec).__name__}")
    vtype = spec.get("type")
    if not isinstance(vtype, str) or not vtype:
        raise ValidatorError(f"{where}: 'type' must be a non-empty string")
    if "tiers" in spec:
        _tiers(spec["tiers"], f"{where} ({vtype})")
        spec = {k: v for k, v in spec.items() if k != "tiers"}
    p = _Params(spec, f"{where} ({vtype})")
    # Built-ins win over a same-named custom entry so a spec means the same thing
    # on every deployment.
    factory = _BUILTINS.get(vtype)
    if factory is None and custom is not None and vtype in custom:
        factory = _make_custom
    if factory is None:
        if vtype in PIPELINE_TYPES:
            raise ValidatorError(
                f"{where}: {vtype!r} compares several completions and is run by the pipeline; "
                "remove it before building per-completion validators"
            )
        types = ", ".join(sorted(VALIDATOR_TYPES | set(custom or ())))
        hint = ""
        if custom is None:
            hint = '; name custom validators as {"type": "custom", "name": ...}'
        raise ValidatorError(f"{where}: unknown type {vtype!r} (known: {types}){hint}")
    params = _KNOWN_PARAMS.get(vtype)
    if params is not None:
        p.reject_unknown(params)
    return factory(vtype, p, custom)


def build_validators(
    specs: list[dict[str, Any]], custom: Mapping[str, str] | None = None
) -> list[Validator]:
    """Build checks from job specs, failing on the first bad one.

    Everything that can be checked without a completion (params, regexes, schemas,
    custom callables and their parameters) is checked here, so a broken job line
    is rejected once instead of failing on every request.
    """
    return _build_all(specs, dict(custom or {}))


def validate_specs(specs: list[dict[str, Any]], custom: Mapping[str, str] | None = None) -> None:
    """Ingestion-time check of a job line's specs: the same checks as building, so
    lines that would fail on the workers are rejected up front.

    Without `custom`, custom checks are only checked for shape (a "custom" spec with
    a string "name", a python_syntax "test" string): config loading and line parsing
    may not have the operator's mapping at hand, and the name is then checked
    against it by the caller. The {"type": <custom name>} shorthand needs the
    mapping to be told apart from a typo, so it is rejected without one.
    """
    _build_all(specs, None if custom is None else dict(custom))


def _build_all(specs: Any, custom: _Mapping) -> list[Validator]:
    if not isinstance(specs, list):
        raise ValidatorError(f"validators: must be a list of objects, got {type(specs).__name__}")
    return [_build_one(i, spec, custom) for i, spec in enumerate(specs)]


# ----------------------------------------------------------------------- running


def run_validators(validators: Sequence[Validator], completion: Completion,
                   request: Mapping[str, Any] | None = None) -> list[Verdict]:
    """Run every check, even after a failure: the escalation record should list all
    problems, and some callers weigh verdicts rather than stopping at the first.

    ``request`` (the request body) is handed to the checks that judge the answer *to
    that query* (``wants_request``, e.g. the learned scorer); the others see only the
    completion, as before.
    """
    verdicts: list[Verdict] = []
    for validator in validators:
        try:
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


def validators_for_response_format(response_format: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Derive checks from the request's own response_format.

    Providers' structured-output modes are not honoured by every tier (or every
    provider behind the same API), so a request that asked for JSON gets checked
    for JSON regardless of who answered it.
    """
    if not isinstance(response_format, dict):
        return []
    kind = response_format.get("type")
    if kind == "json_object":
        return [{"type": "json"}]
    if kind == "json_schema":
        wrapper = response_format.get("json_schema")
        schema = wrapper.get("schema") if isinstance(wrapper, dict) else None
        if schema is None:
            schema = response_format.get("schema")
        if isinstance(schema, dict):
            return [{"type": "json_schema", "schema": schema}]
        return [{"type": "json"}]
    return []
