"""Validators decide what escalates to a pricier tier, so these tests use outputs
that cheap models really produce and pin down both directions: sloppy-but-right
answers must pass (or we overpay) and wrong ones must fail (or we ship them)."""

from __future__ import annotations

from typing import Any

import pytest

from batchroute import validators as vmod
from batchroute.completion import Completion, Usage
from batchroute.validators import (
    Validator,
    ValidatorError,
    Verdict,
    build_validators,
    failure_reason,
    passed,
    run_validators,
    validate_specs,
    validators_for_response_format,
)


def completion(
    content: str, finish_reason: str = "stop", logprobs: list[float] | None = None
) -> Completion:
    return Completion(
        content=content,
        finish_reason=finish_reason,
        usage=Usage(prompt_tokens=12, completion_tokens=7),
        model="gpt-4o-mini",
        request_id="req-1",
        logprobs=logprobs,
    )


def check(spec: dict[str, Any], content: str, **kwargs: Any) -> Verdict:
    (validator,) = build_validators([spec], custom=CUSTOM)
    return validator.check(completion(content, **kwargs))


def build_error(spec: Any, custom: dict[str, str] | None = None) -> str:
    with pytest.raises(ValidatorError) as info:
        build_validators([{"type": "non_empty"}, spec], custom=custom)
    return str(info.value)


# Custom callables, registered below by this module's import name: pytest imports
# tests/ as top-level modules, so `__name__` is whatever makes them importable.


def starts_with_ok(completion: Completion, prefix: str = "OK") -> tuple[bool, str]:
    if completion.content.startswith(prefix):
        return True, ""
    return False, f"does not start with {prefix!r}"


def mentions(completion: Completion, word: str) -> bool:
    return word in completion.content


def scored(completion: Completion) -> Verdict:
    return Verdict("whatever", len(completion.content) > 3, "too short", score=0.5)


def explodes(completion: Completion) -> bool:
    raise RuntimeError("model client not configured")


def returns_junk(completion: Completion) -> Any:
    return "yes"


def defines_solve(code: str) -> tuple[bool, str]:
    return ("def solve(" in code, "no solve() function")


NOT_CALLABLE = 42

CUSTOM = {
    "starts_with_ok": f"{__name__}:starts_with_ok",
    "mentions": f"{__name__}.mentions",
    "scored": f"{__name__}:scored",
    "explodes": f"{__name__}:explodes",
    "returns_junk": f"{__name__}:returns_junk",
    "defines_solve": f"{__name__}:defines_solve",
}


# ----------------------------------------------------------------------- non_empty


@pytest.mark.parametrize("content", ["", "   \n\t "])
def test_non_empty_fails_blank(content: str) -> None:
    verdict = check({"type": "non_empty"}, content)
    assert not verdict.ok
    assert verdict.validator == "non_empty"
    assert verdict.reason.startswith("non_empty: ")


def test_non_empty_passes_text() -> None:
    assert check({"type": "non_empty"}, " The capital is Paris. ").ok


# ------------------------------------------------------------------- finish_reason


def test_finish_reason_length_is_truncated() -> None:
    verdict = check({"type": "finish_reason"}, "The report covers three", finish_reason="length")
    assert not verdict.ok
    assert verdict.reason == "truncated (finish_reason=length)"


def test_finish_reason_content_filter_fails() -> None:
    verdict = check({"type": "finish_reason"}, "", finish_reason="content_filter")
    assert not verdict.ok
    assert "content_filter" in verdict.reason


@pytest.mark.parametrize("reason", ["stop", "end_turn", "tool_calls"])
def test_finish_reason_defaults_pass(reason: str) -> None:
    assert check({"type": "finish_reason"}, "done", finish_reason=reason).ok


def test_finish_reason_allowed_overrides_defaults() -> None:
    spec = {"type": "finish_reason", "allowed": ["stop"]}
    assert check(spec, "x", finish_reason="stop").ok
    verdict = check(spec, "x", finish_reason="tool_calls")
    assert not verdict.ok
    assert verdict.reason == "finish_reason: 'tool_calls' not in [stop]"
    # Still reported as truncation, the more useful diagnosis.
    assert check(spec, "x", finish_reason="length").reason == "truncated (finish_reason=length)"


# ------------------------------------------------------------------------- choices

SENTIMENT = {"type": "choices", "choices": ["positive", "negative", "neutral"]}


@pytest.mark.parametrize(
    "content",
    [
        "positive",
        "Positive.",
        '"negative"',
        "'neutral'",
        "`positive`",
        "  NEGATIVE!\n",
        "Answer: positive",
        "Label: Negative.",
        'Answer: "neutral".',
        "**Positive**",
        "**Answer:** positive",
        "“negative”",
    ],
)
def test_choices_accepts_decorated_labels(content: str) -> None:
    verdict = check(SENTIMENT, content)
    assert verdict.ok, verdict.reason


@pytest.mark.parametrize(
    "content",
    ["I think it's positive", "positive or negative", "mixed", "", "The answer is: positive"],
)
def test_choices_rejects_answers_that_are_not_a_bare_label(content: str) -> None:
    verdict = check(SENTIMENT, content)
    assert not verdict.ok
    assert verdict.reason.startswith("choices: ")
    assert "not in [positive, negative, neutral]" in verdict.reason


def test_choices_reason_format() -> None:
    verdict = check({"type": "choices", "choices": ["yes", "no"]}, "Maybe.")
    assert verdict.reason == "choices: 'Maybe' not in [yes, no]"


def test_choices_reason_truncates_long_answers() -> None:
    rambling = "Well, it depends on how you look at it, but overall I would lean " * 5
    verdict = check(SENTIMENT, rambling)
    quoted = verdict.reason.split(" not in ")[0]
    assert len(quoted) < len("choices: ") + 50
    assert "..." in quoted


def test_choices_case_sensitive() -> None:
    spec = {"type": "choices", "choices": ["A", "B"], "case_sensitive": True}
    assert check(spec, "A.").ok
    assert not check(spec, "a").ok


def test_choices_labels_are_normalised_too() -> None:
    assert check({"type": "choices", "choices": ["Yes.", '"No"']}, "no").ok


# ---------------------------------------------------------------------------- json


@pytest.mark.parametrize(
    "content",
    [
        '{"sentiment": "positive", "confidence": 0.9}',
        "  [1, 2, 3]\n",
        '```json\n{"sentiment": "positive"}\n```',
        '```JSON\n{"a": 1}\n```\n',
        '```\n{"a": 1}\n```',
    ],
)
def test_json_accepts_plain_and_whole_fenced(content: str) -> None:
    verdict = check({"type": "json"}, content)
    assert verdict.ok, verdict.reason


@pytest.mark.parametrize(
    "content",
    [
        'Here is the JSON you asked for:\n{"sentiment": "positive"}',
        '{"sentiment": "positive"}\nLet me know if you need anything else!',
        'Sure!\n```json\n{"a": 1}\n```',
        '{"sentiment": "positive",',
        "",
        '{"score": NaN}',
    ],
)
def test_json_rejects_prose_truncation_and_non_standard(content: str) -> None:
    verdict = check({"type": "json"}, content)
    assert not verdict.ok
    assert verdict.reason.startswith("json: ")


def test_json_reason_has_position() -> None:
    verdict = check({"type": "json"}, '{\n  "a": 1,\n  "b": }')
    assert "line 3 column" in verdict.reason


# --------------------------------------------------------------------- json_schema

EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "date": {"type": "string", "format": "date"},
        "attendees": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "date"],
    "additionalProperties": False,
}
EVENT = {"type": "json_schema", "schema": EVENT_SCHEMA}


def test_json_schema_passes_valid_and_fenced() -> None:
    assert check(EVENT, '{"title": "Standup", "date": "2024-05-01"}').ok
    assert check(EVENT, '```json\n{"title": "Standup", "date": "2024-05-01"}\n```').ok


def test_json_schema_missing_required_field() -> None:
    verdict = check(EVENT, '{"title": "Standup"}')
    assert not verdict.ok
    assert verdict.reason == "json_schema: $: 'date' is a required property"


def test_json_schema_wrong_type_names_path() -> None:
    verdict = check(EVENT, '{"title": "Standup", "date": 20240501}')
    assert not verdict.ok
    assert verdict.reason.startswith("json_schema: $.date: ")
    assert "not of type 'string'" in verdict.reason


def test_json_schema_checks_formats() -> None:
    verdict = check(EVENT, '{"title": "Standup", "date": "next Tuesday"}')
    assert not verdict.ok
    assert verdict.reason.startswith("json_schema: $.date: 'next Tuesday'")


def test_json_schema_array_path_and_extra_count() -> None:
    content = '{"title": "x", "date": "2024-05-01", "attendees": ["a", 2], "room": 4}'
    verdict = check(EVENT, content)
    assert not verdict.ok
    assert "(+1 more)" in verdict.reason


def test_json_schema_reports_parse_errors_like_json() -> None:
    verdict = check(EVENT, 'Here you go: {"title": "x", "date": "2024-05-01"}')
    assert not verdict.ok
    assert verdict.reason.startswith("json_schema: invalid JSON: ")


def test_json_schema_reason_stays_short() -> None:
    schema = {"type": "object", "properties": {"blob": {"type": "integer"}}}
    verdict = check({"type": "json_schema", "schema": schema}, '{"blob": "' + "x" * 5000 + '"}')
    assert not verdict.ok
    assert len(verdict.reason) < 250


def test_json_schema_remote_ref_is_refused_when_built_and_never_fetched_when_run() -> None:
    schema = {"$ref": "https://example.invalid/event.json"}
    spec = {"type": "json_schema", "schema": schema}
    with pytest.raises(ValidatorError, match="is not a local reference"):
        build_validators([spec])
    # Built past the spec check (as a config could), it fails the answer instead.
    from batchroute.validators.checks import _JsonSchema

    verdict = _JsonSchema("json_schema", schema).check(completion("{}"))
    assert not verdict.ok
    assert "cannot be resolved" in verdict.reason


def test_json_schema_honours_declared_draft() -> None:
    # Draft 4 spells exclusive bounds as booleans, which 2020-12 would reject.
    schema = {
        "$schema": "http://json-schema.org/draft-04/schema#",
        "type": "number",
        "maximum": 1,
        "exclusiveMaximum": True,
    }
    spec = {"type": "json_schema", "schema": schema}
    assert check(spec, "0.5").ok
    assert not check(spec, "1").ok


# --------------------------------------------------------------------------- regex


def test_regex_search_default() -> None:
    spec = {"type": "regex", "pattern": r"\b\d{4}-\d{2}-\d{2}\b"}
    assert check(spec, "The meeting is on 2024-05-01 at noon.").ok
    verdict = check(spec, "The meeting is next Tuesday.")
    assert not verdict.ok
    assert verdict.reason.startswith("regex: no match for /")


def test_regex_fullmatch_and_flags() -> None:
    spec = {"type": "regex", "pattern": r"[A-D]", "mode": "fullmatch", "flags": "i"}
    assert check(spec, "b\n").ok
    verdict = check(spec, "The answer is B")
    assert not verdict.ok
    assert "does not fully match" in verdict.reason


def test_regex_multiline_flag() -> None:
    spec = {"type": "regex", "pattern": r"^Summary:", "flags": "m"}
    assert check(spec, "Title: x\nSummary: y").ok
    assert not check({"type": "regex", "pattern": r"^Summary:"}, "Title: x\nSummary: y").ok


# -------------------------------------------------------------- max/min_length

SUMMARY = (
    "The council approved the new budget after a long debate. Spending on parks rises "
    "by ten percent, while the road repair fund is cut. The vote was seven to two."
)


def test_max_length_words() -> None:
    ok = check({"type": "max_length", "max_words": 50}, SUMMARY)
    assert ok.ok
    assert ok.score is not None and 0 < ok.score < 1
    verdict = check({"type": "max_length", "max_words": 20}, SUMMARY)
    assert not verdict.ok
    assert verdict.reason == f"max_length: {len(SUMMARY.split())} words > 20"
    assert verdict.score == pytest.approx(len(SUMMARY.split()) / 20)


def test_max_length_chars_and_words_reports_worst() -> None:
    verdict = check({"type": "max_length", "max_chars": 100, "max_words": 1000}, SUMMARY)
    assert not verdict.ok
    assert "chars > 100" in verdict.reason
    assert "words" not in verdict.reason
    assert verdict.score == pytest.approx(len(SUMMARY) / 100)


def test_min_length() -> None:
    assert check({"type": "min_length", "min_words": 10}, SUMMARY).ok
    verdict = check({"type": "min_length", "min_words": 10, "min_chars": 5}, "Budget passed.")
    assert not verdict.ok
    assert verdict.reason == "min_length: 2 words < 10"
    assert verdict.score == pytest.approx(0.2)


# ------------------------------------------------------------------- python_syntax

GOOD_CODE = """Here is the function:

```python
def solve(xs: list[int]) -> int:
    return sum(x * x for x in xs)
```

It squares and sums."""

TRUNCATED_CODE = """```python
def solve(xs):
    total = 0
    for x in xs:
        total += (x *"""


def test_python_syntax_extracts_fenced_block() -> None:
    assert check({"type": "python_syntax"}, GOOD_CODE).ok


def test_python_syntax_accepts_py_and_bare_fences_and_raw_code() -> None:
    assert check({"type": "python_syntax"}, "```py\nprint('hi')\n```").ok
    assert check({"type": "python_syntax"}, "Code:\n```\nx = 1\n```").ok
    assert check({"type": "python_syntax"}, "def f():\n    return 1\n").ok


def test_python_syntax_prefers_python_block_over_others() -> None:
    content = "Install:\n```bash\npip install foo\n```\nThen:\n```python\nimport foo\n```"
    assert check({"type": "python_syntax"}, content).ok


def test_python_syntax_truncated_code() -> None:
    verdict = check({"type": "python_syntax"}, TRUNCATED_CODE)
    assert not verdict.ok
    assert verdict.reason.startswith("python_syntax: line ")
    assert "not closed" in verdict.reason


def test_python_syntax_reports_line_number() -> None:
    verdict = check({"type": "python_syntax"}, "```python\nx = 1\ny = (2\nz = 3 +\n```")
    assert not verdict.ok
    assert "line " in verdict.reason


def test_python_syntax_empty_block_fails() -> None:
    verdict = check({"type": "python_syntax"}, "```python\n```")
    assert not verdict.ok
    assert verdict.reason == "python_syntax: no code"


def test_python_syntax_does_not_trip_on_parse_warnings() -> None:
    # An invalid escape only warns; it must not fail (or crash under -W error).
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check({"type": "python_syntax"}, 'path = "C:\\d"\n').ok


def test_python_syntax_named_test() -> None:
    spec = {"type": "python_syntax", "test": "defines_solve"}
    assert check(spec, GOOD_CODE).ok
    verdict = check(spec, "```python\ndef answer():\n    return 1\n```")
    assert not verdict.ok
    assert verdict.reason == "python_syntax: test 'defines_solve' failed: no solve() function"


def test_python_syntax_test_must_be_registered() -> None:
    message = build_error({"type": "python_syntax", "test": f"{__name__}:defines_solve"})
    assert message.startswith("validators[1] (python_syntax): 'test'")


# -------------------------------------------------------------- logprob_confidence


def test_logprob_confidence_pass_and_fail() -> None:
    spec = {"type": "logprob_confidence", "threshold": -0.5}
    confident = check(spec, "positive", logprobs=[-0.01, -0.2, -0.05])
    assert confident.ok
    assert confident.score == pytest.approx(-0.26 / 3)
    unsure = check(spec, "positive", logprobs=[-0.9, -1.2, -0.4])
    assert not unsure.ok
    assert unsure.score == pytest.approx(-2.5 / 3)
    assert unsure.reason == "logprob_confidence: mean logprob -0.833 < -0.5"


@pytest.mark.parametrize("logprobs", [None, []])
def test_logprob_confidence_missing(logprobs: list[float] | None) -> None:
    spec: dict[str, Any] = {"type": "logprob_confidence", "threshold": -0.5}
    verdict = check(spec, "positive", logprobs=logprobs)
    assert not verdict.ok
    assert verdict.reason == "no logprobs returned"
    spec["missing_ok"] = True
    verdict = check(spec, "positive", logprobs=logprobs)
    assert verdict.ok
    assert verdict.score is None


# -------------------------------------------------------------------------- custom


def test_custom_by_name_and_by_type() -> None:
    assert check({"type": "custom", "name": "starts_with_ok"}, "OK, done").ok
    verdict = check({"type": "starts_with_ok", "prefix": "DONE"}, "OK, done")
    assert not verdict.ok
    assert verdict.validator == "starts_with_ok"
    assert verdict.reason == "starts_with_ok: does not start with 'DONE'"


def test_custom_validator_name_is_spec_type() -> None:
    verdict = check({"type": "custom", "name": "mentions", "word": "Paris"}, "It is Lyon.")
    assert verdict.validator == "custom"
    assert verdict.reason == "mentions: failed"


def test_custom_dotted_form_without_colon_resolves() -> None:
    assert check({"type": "mentions", "word": "Paris"}, "The capital is Paris.").ok


def test_custom_returning_verdict_keeps_score_and_reason() -> None:
    verdict = check({"type": "scored"}, "ab")
    assert verdict == Verdict("scored", False, "too short", 0.5)


def test_custom_errors_become_failed_verdicts() -> None:
    crashed = check({"type": "explodes"}, "x")
    assert not crashed.ok
    assert crashed.reason == "explodes: raised RuntimeError: model client not configured"
    junk = check({"type": "returns_junk"}, "x")
    assert not junk.ok
    assert "returned str" in junk.reason


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "custom", "name": f"{__name__}:starts_with_ok"},
        {"type": "custom", "name": "os:system"},
        {"type": "custom", "name": "os.system"},
        {"type": f"{__name__}:starts_with_ok"},
        {"type": "custom", "name": "starts_with_ok", "path": "os:system"},
    ],
)
def test_specs_cannot_name_code_directly(spec: dict[str, Any]) -> None:
    custom = {"starts_with_ok": f"{__name__}:starts_with_ok"}
    with pytest.raises(ValidatorError, match=r"^validators\[1\]"):
        build_validators([{"type": "non_empty"}, spec], custom=custom)


def test_dotted_path_rejection_explains_mapping() -> None:
    message = build_error({"type": "custom", "name": "os:system"})
    assert "register it in the custom mapping" in message


def test_custom_needs_a_mapping_entry() -> None:
    message = build_error({"type": "custom", "name": "starts_with_ok"})
    assert message.startswith("validators[1] (custom): 'name' 'starts_with_ok'")


def test_custom_bad_mapping_entries() -> None:
    missing = build_error({"type": "x"}, custom={"x": f"{__name__}:no_such_function"})
    assert missing.startswith("validators[1] (x): cannot load custom validator 'x'")
    bad_module = build_error({"type": "x"}, custom={"x": "no_such_module_hopefully:f"})
    assert "cannot load" in bad_module
    not_callable = build_error({"type": "x"}, custom={"x": f"{__name__}:NOT_CALLABLE"})
    assert "not callable" in not_callable


def test_custom_params_are_checked_against_signature() -> None:
    message = build_error({"type": "starts_with_ok", "prefx": "OK"}, custom=CUSTOM)
    assert message.startswith("validators[1] (starts_with_ok): parameters do not fit")
    message = build_error({"type": "mentions"}, custom=CUSTOM)
    assert "word" in message


def test_builtin_wins_over_same_named_custom() -> None:
    (validator,) = build_validators(
        [{"type": "json"}], custom={"json": f"{__name__}:starts_with_ok"}
    )
    assert validator.check(completion("[1]")).ok


# ---------------------------------------------------------------------- spec errors


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"type": "sentiment"}, "validators[1]: unknown type 'sentiment'"),
        ({"choices": ["a"]}, "validators[1]: 'type' must be a non-empty string"),
        ("json", "validators[1]: must be an object"),
        ({"type": "choices"}, "validators[1] (choices): 'choices' must be a non-empty list"),
        (
            {"type": "choices", "choices": []},
            "validators[1] (choices): 'choices' must be a non-empty list of strings",
        ),
        ({"type": "choices", "choices": ["a", 1]}, "validators[1] (choices): 'choices'"),
        ({"type": "choices", "choices": ["a"], "case_sensitive": "no"}, "'case_sensitive'"),
        ({"type": "choices", "choice": ["a"]}, "unknown parameter 'choice'"),
        ({"type": "regex"}, "validators[1] (regex): 'pattern'"),
        ({"type": "regex", "pattern": "([a-z]+"}, "validators[1] (regex): 'pattern' is not a"),
        ({"type": "regex", "pattern": "a", "flags": "q"}, "'flags' has unknown flag 'q'"),
        ({"type": "regex", "pattern": "a", "mode": "match"}, "'mode' must be"),
        ({"type": "json_schema"}, "validators[1] (json_schema): 'schema'"),
        (
            {"type": "json_schema", "schema": {"type": "objekt"}},
            "validators[1] (json_schema): 'schema' is not a valid JSON Schema: $.type",
        ),
        (
            {"type": "json_schema", "schema": {"properties": {"a": {"minLength": -1}}}},
            "$.properties.a.minLength",
        ),
        ({"type": "max_length"}, "validators[1] (max_length): needs 'max_chars'"),
        ({"type": "min_length", "min_words": 0}, "'min_words' must be a positive integer"),
        ({"type": "max_length", "max_chars": True}, "'max_chars' must be a positive integer"),
        ({"type": "logprob_confidence"}, "validators[1] (logprob_confidence): 'threshold'"),
        ({"type": "logprob_confidence", "threshold": 0.8}, "must be <= 0"),
        ({"type": "finish_reason", "allowed": "stop"}, "'allowed' must be a non-empty list"),
        ({"type": "json", "strict": True}, "validators[1] (json): unknown parameter 'strict'"),
        ({"type": "consensus", "n": 3}, "validators[1] (consensus): unknown parameter 'n'"),
    ],
)
def test_spec_errors_name_index_and_field(spec: Any, expected: str) -> None:
    message = build_error(spec)
    assert expected in message


def test_specs_must_be_a_list() -> None:
    with pytest.raises(ValidatorError, match="validators: must be a list"):
        build_validators({"type": "json"})  # type: ignore[arg-type]


def test_validator_error_is_value_error() -> None:
    assert issubclass(ValidatorError, ValueError)


def test_validate_specs_matches_build() -> None:
    validate_specs([{"type": "json"}, {"type": "choices", "choices": ["a", "b"]}])
    validate_specs([{"type": "starts_with_ok"}], custom=CUSTOM)
    with pytest.raises(ValidatorError, match=r"validators\[0\] \(regex\)"):
        validate_specs([{"type": "regex", "pattern": "("}])
    with pytest.raises(ValidatorError, match="'name' 'nope'"):
        validate_specs([{"type": "custom", "name": "nope"}], custom=CUSTOM)
    with pytest.raises(ValidatorError, match="parameters do not fit"):
        validate_specs([{"type": "mentions"}], custom=CUSTOM)


def test_validate_specs_without_mapping_checks_custom_shape_only() -> None:
    # Config loading and line parsing may not have the operator's mapping; the
    # caller checks the name against it, so only the shape is checked here.
    validate_specs([{"type": "custom", "name": "anything", "word": "x"}])
    validate_specs([{"type": "python_syntax", "test": "anything"}])
    with pytest.raises(ValidatorError, match=r"validators\[0\] \(custom\): 'name'"):
        validate_specs([{"type": "custom"}])
    with pytest.raises(ValidatorError, match="unknown type 'starts_with_ok'"):
        validate_specs([{"type": "starts_with_ok"}])
    # Building never defers: without the mapping a custom spec cannot run.
    with pytest.raises(ValidatorError):
        build_validators([{"type": "custom", "name": "anything"}])


def test_every_builtin_declares_its_params() -> None:
    assert set(vmod._KNOWN_PARAMS) == vmod.VALIDATOR_TYPES - {"custom"}


# ------------------------------------------------------------------------- running


def test_run_validators_runs_all_and_joins_failures() -> None:
    validators = build_validators(
        [
            {"type": "non_empty"},
            {"type": "finish_reason"},
            {"type": "choices", "choices": ["yes", "no"]},
            {"type": "max_length", "max_words": 2},
        ]
    )
    verdicts = run_validators(validators, completion("Maybe, hard to say", finish_reason="length"))
    assert [v.validator for v in verdicts] == [
        "non_empty",
        "finish_reason",
        "choices",
        "max_length",
    ]
    assert [v.ok for v in verdicts] == [True, False, False, False]
    assert not passed(verdicts)
    assert failure_reason(verdicts) == (
        "truncated (finish_reason=length); "
        "choices: 'Maybe, hard to say' not in [yes, no]; "
        "max_length: 4 words > 2"
    )


def test_passed_and_failure_reason_edge_cases() -> None:
    assert passed([])
    assert failure_reason([]) == ""
    ok = [Verdict("json", True), Verdict("choices", True)]
    assert passed(ok)
    assert failure_reason(ok) == ""
    assert failure_reason([Verdict("mystery", False)]) == "mystery: failed"


class _Broken:
    name = "broken"

    def check(self, completion: Completion) -> Verdict:
        raise KeyError("oops")


def test_run_validators_survives_a_crashing_validator() -> None:
    broken: Validator = _Broken()
    (json_check,) = build_validators([{"type": "json"}])
    verdicts = run_validators([broken, json_check], completion("{}"))
    assert [v.ok for v in verdicts] == [False, True]
    assert verdicts[0].reason.startswith("broken: raised KeyError")


# ------------------------------------------------------------------ response_format


def test_validators_for_response_format() -> None:
    assert validators_for_response_format(None) == []
    assert validators_for_response_format({"type": "text"}) == []
    assert validators_for_response_format({"type": "json_object"}) == [{"type": "json"}]
    rf = {
        "type": "json_schema",
        "json_schema": {"name": "event", "strict": True, "schema": EVENT_SCHEMA},
    }
    specs = validators_for_response_format(rf)
    assert specs == [{"type": "json_schema", "schema": EVENT_SCHEMA}]
    (validator,) = build_validators(specs)
    assert not validator.check(completion('{"title": "x"}')).ok
    assert validators_for_response_format({"type": "json_schema", "json_schema": {}}) == [
        {"type": "json"}
    ]
