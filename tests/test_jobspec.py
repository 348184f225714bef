from __future__ import annotations

import json

import pytest

from batchroute.config import load_config
from batchroute.jobspec import LineProblem, parse_line

CONFIG = load_config()


def line(**over: object) -> str:
    obj: dict = {"custom_id": "a-1", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 20},
                 "batchroute": {"task": "classify",
                                "validators": [{"type": "choices", "choices": ["yes", "no"]}],
                                "metadata": {"team": "support"}}}
    for key, value in over.items():
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
    return json.dumps(obj)


def test_good_line() -> None:
    spec = parse_line(line(), 1, CONFIG)
    assert spec.custom_id == "a-1"
    assert spec.task == "classify"
    assert spec.reference_model == "gpt-4o"
    assert spec.validators == [{"type": "choices", "choices": ["yes", "no"]}]
    assert spec.metadata == {"team": "support"}


def test_auto_model_has_no_reference_and_batchroute_field_is_optional() -> None:
    spec = parse_line(json.dumps({"custom_id": "x", "body": {
        "model": "auto", "messages": [{"role": "user", "content": "hi"}]}}), 3, CONFIG)
    assert spec.reference_model is None
    assert spec.task == "default"


def test_response_format_implies_a_schema_validator() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    body = {"model": "auto", "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "s",
                                                                       "schema": schema}}}
    spec = parse_line(json.dumps({"custom_id": "x", "body": body}), 1, CONFIG)
    assert {"type": "json_schema", "schema": schema} in spec.validators


def test_bom_and_crlf_are_accepted_on_the_first_line() -> None:
    raw = b"\xef\xbb\xbf" + line().encode() + b"\r\n"
    assert parse_line(raw, 1, CONFIG).custom_id == "a-1"


@pytest.mark.parametrize(("raw", "reason"), [
    ('{"custom_id": "a-1", "body": ', "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (line(custom_id=None), "custom_id: required"),
    (line(custom_id=17), "custom_id: required"),
    (line(body=None), "body: required"),
    (line(body={"messages": []}), "body.messages: must be a non-empty list"),
    (line(body={"messages": [{"role": "robot", "content": "x"}]}), "body.messages[0].role"),
    (line(body={"messages": [{"role": "user", "content": 5}]}), "body.messages[0].content"),
    (line(body={"model": 4, "messages": [{"role": "user", "content": "x"}]}), "body.model"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
     "body.max_tokens"),
    (line(url="/v1/embeddings"), "url: only /v1/chat/completions"),
    (line(method="GET"), "method: only POST"),
    (line(batchroute={"task": "poetry"}), "batchroute.task: unknown task 'poetry'"),
    (line(batchroute={"pin": "nope"}), "batchroute.pin"),
    (line(batchroute={"max_tier": 0}), "batchroute.max_tier"),
    (line(batchroute={"validators": [{"type": "nope"}]}), "batchroute.validators"),
    (line(batchroute={"validators": [{"type": "custom", "name": "evil"}]}),
     "batchroute.validators"),
    (line(batchroute=[1]), "batchroute: must be an object"),
])
def test_bad_lines_name_the_field(raw: str, reason: str) -> None:
    with pytest.raises(LineProblem) as e:
        parse_line(raw, 7, CONFIG)
    assert reason in str(e.value)


def test_invalid_utf8() -> None:
    with pytest.raises(LineProblem, match="invalid UTF-8"):
        parse_line(b'{"custom_id": "\xff"}', 2, CONFIG)
