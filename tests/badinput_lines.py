"""Hostile and broken job lines beyond tests/test_badinput.py: the cases of issue #15
(patterns that backtrack, schemas that reach out or nest, NUL characters, giant
custom_ids, deep nesting anywhere in a line) and the remaining field-level mistakes.

Each case is (id, the line's bytes, a fragment the line's error must contain). The
lines are data, not tests: tests/test_hostile_lines.py runs them all in one batch per
store, SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from typing import Any


def line(custom_id: Any = "x", body: Any = ..., **extra: Any) -> bytes:
    obj: dict[str, Any] = {"custom_id": custom_id, "method": "POST",
                           "url": "/v1/chat/completions"}
    if body is ...:
        body = {"model": "auto", "messages": [{"role": "user", "content": "Say hi."}]}
    obj["body"] = body
    obj.update(extra)
    return json.dumps(obj).encode()


def body(content: Any = "Say hi.", **extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": content}], **extra}


def checks(*specs: dict[str, Any], cid: str = "v") -> bytes:
    return line(cid, batchroute={"validators": list(specs)})


def regex(pattern: Any, cid: str = "re", **extra: Any) -> bytes:
    return checks({"type": "regex", "pattern": pattern, **extra}, cid=cid)


def extract(pattern: str, cid: str = "cx") -> bytes:
    return checks({"type": "consensus", "k": 3, "extract": pattern}, cid=cid)


def schema_check(schema: Any, cid: str = "js") -> bytes:
    return checks({"type": "json_schema", "schema": schema}, cid=cid)


def response_format(schema: Any, cid: str = "rf") -> bytes:
    return line(cid, body(response_format={"type": "json_schema",
                                            "json_schema": {"name": "x", "schema": schema}}))


def tool(parameters: Any, cid: str = "tl", name: str = "f") -> bytes:
    return line(cid, body(tools=[{"type": "function", "function": {
        "name": name, "parameters": parameters}}]))


def nested_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def nested_list(depth: int, leaf: Any = "x") -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def nested_dict(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


def nul(raw: bytes) -> bytes:
    """Turn the placeholder NUL-HERE into a JSON \\u0000 escape (json.dumps would double
    the backslash)."""
    return raw.replace(b"NUL-HERE", b"\\u0000")


RE2_HINT = "(RE2, linear-time: no backreferences or lookaround)"
NOT_LOCAL = "is not a local reference"
TOO_DEEP = "nested deeper than"
NUL = "a NUL character (\\u0000)"

HOSTILE: list[tuple[str, bytes, str]] = [
    # ---- patterns: RE2 refuses what could backtrack, at ingest, naming the line
    ("regex-backreference", regex(r"(a+)\1"), RE2_HINT),
    ("regex-named-backreference", regex(r"(?P<x>a)(?P=x)"), RE2_HINT),
    ("regex-lookahead", regex(r"(?=a+)a"), RE2_HINT),
    ("regex-negative-lookahead", regex(r"(?!b)a"), RE2_HINT),
    ("regex-lookbehind", regex(r"(?<=a)b"), RE2_HINT),
    ("regex-negative-lookbehind", regex(r"(?<!a)b"), RE2_HINT),
    ("regex-atomic-group", regex(r"(?>a+)b"), RE2_HINT),
    ("regex-possessive", regex(r"a++b"), RE2_HINT),
    ("regex-conditional", regex(r"(a)?(?(1)b|c)"), RE2_HINT),
    ("regex-backslash-Z", regex(r"done\Z"), RE2_HINT),
    ("regex-huge-repeat", regex(r"a{1001}"), "invalid repetition size"),
    ("regex-nested-repeat-blowup", regex(r"((a{100}){100}){100}"), "invalid repetition size"),
    ("regex-over-1000-chars", regex("a" * 1001), "more than the 1000 allowed"),
    ("regex-100k-chars", regex("(a|b)" * 20_000), "more than the 1000 allowed"),
    ("regex-unbalanced", regex("(abc"), "'pattern' is not a valid regular expression"),
    ("regex-verbose-flag", regex(r"a b", flags="x"), "'flags' has flag 'x' (verbose)"),
    ("regex-unknown-flag", regex("a", flags="u"), "'flags' has unknown flag 'u'"),
    ("regex-flags-not-string", regex("a", flags=2), "'flags' must be a string"),
    ("regex-pattern-number", regex(5), "'pattern' must be a non-empty string"),
    ("regex-pattern-empty", regex(""), "'pattern' must be a non-empty string"),
    ("regex-bad-mode", regex("a", mode="match"), "'mode' must be 'search' or 'fullmatch'"),
    ("extract-backreference", extract(r"(\d)\1"), RE2_HINT),
    ("extract-lookbehind", extract(r"(?<=#### )\d+"), RE2_HINT),
    ("extract-too-long", extract("x" * 5000), "more than the 1000 allowed"),
    ("extract-two-groups", extract(r"(a)(b)"), "at most one group"),
    ("extract-unbalanced", extract(r"(\d+"), "'extract' is not a valid regular expression"),
    # ---- schemas: resolved only within themselves, depth and size limited
    ("schema-ref-http", schema_check({"$ref": "http://127.0.0.1:9/s.json"}), NOT_LOCAL),
    ("schema-ref-https", schema_check({"$ref": "https://example.com/s.json"}), NOT_LOCAL),
    ("schema-ref-file", schema_check({"$ref": "file:///etc/passwd"}), NOT_LOCAL),
    ("schema-ref-relative", schema_check({"$ref": "other.json"}), NOT_LOCAL),
    ("schema-ref-absolute-path", schema_check({"$ref": "/etc/passwd"}), NOT_LOCAL),
    ("schema-ref-nested-remote", schema_check(
        {"type": "object", "properties": {"a": {"$ref": "http://169.254.169.254/latest"}}}),
     NOT_LOCAL),
    ("schema-dynamic-ref-remote", schema_check({"$dynamicRef": "http://evil.test/x"}),
     NOT_LOCAL),
    ("schema-id-plus-relative-ref", schema_check(
        {"$id": "http://127.0.0.1:9/", "$ref": "passwd"}), NOT_LOCAL),
    ("schema-40-levels", schema_check(nested_schema(20)), "nested deeper than 32 levels"),
    ("schema-over-10k-nodes", schema_check(
        {"type": "object", "properties": {f"p{i}": {"type": "string"}
                                          for i in range(12_000)}}),
     "more than 10000 nodes"),
    ("schema-over-256kb", schema_check({"enum": ["x" * 300_000]}), "more than the 262144"),
    ("schema-not-object", schema_check([{"type": "string"}]),
     "'schema' must be a JSON Schema object"),
    ("schema-invalid-type", schema_check({"type": 5}), "is not a valid JSON Schema"),
    ("response-format-ref-http", response_format({"$ref": "http://127.0.0.1:9/x"}),
     NOT_LOCAL),
    ("response-format-ref-file", response_format(
        {"type": "object", "properties": {"p": {"$ref": "file:///etc/shadow"}}}), NOT_LOCAL),
    ("response-format-deep-schema", response_format(nested_schema(20)),
     "nested deeper than 32 levels"),
    ("response-format-100-levels", response_format(nested_schema(100)), TOO_DEEP),
    ("response-format-bad-schema", response_format({"type": "nonsense"}),
     "is not a valid JSON Schema"),
    ("tool-parameters-deep", tool(nested_schema(20)), "nested deeper than 32 levels"),
    ("tool-parameters-remote-ref", tool({"$ref": "http://127.0.0.1:9/t"}), NOT_LOCAL),
    ("tools-array-100-levels", line("ta", body(tools=nested_list(100))), TOO_DEEP),
    # ---- nesting anywhere in a line: a line error, never a RecursionError
    ("content-nested-100", line("n1", body(nested_list(100))), TOO_DEEP),
    ("metadata-nested-65", line("n2", batchroute={"metadata": nested_dict(65)}), TOO_DEEP),
    ("extra-body-field-nested-70", line("n3", body(extra=nested_list(70))), TOO_DEEP),
    ("message-field-nested-80", line("n4", {"model": "auto", "messages": [
        {"role": "user", "content": "hi", "name": nested_dict(80)}]}), TOO_DEEP),
    ("validator-spec-nested-90", checks({"type": "choices", "choices": nested_list(90)}),
     TOO_DEEP),
    ("top-level-field-nested-500", line("n5", extra=nested_list(500)), TOO_DEEP),
    ("nested-2000-brackets", b'{"custom_id": "n6", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}",
     "nested too deeply"),
    ("nested-2kb-schema-line", schema_check(nested_schema(120)), TOO_DEEP),
    # ---- NUL characters (PostgreSQL cannot store them): a line error, wherever they are
    ("nul-in-content", nul(line("z1", body("hello NUL-HERE world"))), NUL),
    ("nul-in-custom-id", nul(line("zNUL-HERE2")), NUL),
    ("nul-in-key", nul(line("z3", body(**{"weirdNUL-HERE": 1}))), NUL),
    ("nul-in-metadata", nul(line("z4", batchroute={"metadata": {"team": "aNUL-HERE"}})), NUL),
    ("nul-in-model", nul(line("z5", {"model": "gptNUL-HERE", "messages": [
        {"role": "user", "content": "hi"}]})), NUL),
    ("nul-in-task", nul(line("z6", batchroute={"task": "classifyNUL-HERE"})), NUL),
    ("nul-in-choice", nul(checks({"type": "choices", "choices": ["yes", "noNUL-HERE"]},
                                 cid="z7")), NUL),
    ("nul-in-system-message", nul(line("z8", {"model": "auto", "messages": [
        {"role": "system", "content": "NUL-HERE"}, {"role": "user", "content": "hi"}]})), NUL),
    ("nul-in-content-part", nul(line("z9", body([{"type": "text", "text": "aNUL-HEREb"}]))),
     NUL),
    ("nul-in-tool-name", nul(tool({"type": "object"}, cid="z10", name="fNUL-HERE")), NUL),
    ("nul-in-regex", nul(regex("aNUL-HERE", cid="z11")), NUL),
    ("nul-only-custom-id", nul(line("NUL-HERE")), NUL),
    # ---- over 1 MB, the unsendable values are found by a walk instead of a re-serialisation
    ("lone-surrogate-in-1mb-line", line("u1", body("SURR-HERE x", pad="p" * (1 << 20)))
     .replace(b"SURR-HERE", b"\\ud800"), "lone surrogate"),
    ("surrogate-key-in-1mb-line", line("u2", body("x", pad="p" * (1 << 20), k={"SURR-HERE": 1}))
     .replace(b"SURR-HERE", b"\\udfff"), "lone surrogate"),
    ("infinite-number-in-1mb-line", line("u3", body("x", pad="p" * (1 << 20),
                                                    temperature="INF-HERE"))
     .replace(b'"INF-HERE"', b"1e999"), "a number is out of range"),
    # ---- custom_id: a key everywhere, bounded
    ("custom-id-513-chars", line("c" * 513), "custom_id: 513 characters long, at most 512"),
    ("custom-id-100k-chars", line("c" * 100_000), "at most 512 allowed"),
    ("custom-id-object", line({"id": 1}), "custom_id: required, a non-empty string"),
    ("custom-id-list", line(["a"]), "custom_id: required, a non-empty string"),
    ("custom-id-null", line(None), "custom_id: required, a non-empty string"),
    ("custom-id-empty", line(""), "custom_id: required, a non-empty string"),
    # ---- the remaining field-level mistakes
    ("model-null", line("f1", {"model": None, "messages": [{"role": "user", "content": "h"}]}),
     "body.model: must be a string"),
    ("max-completion-tokens-negative", line("f2", body(max_completion_tokens=-5)),
     "body.max_completion_tokens: must be a positive integer"),
    ("max-tokens-bool", line("f3", body(max_tokens=True)),
     "body.max_tokens: must be a positive integer"),
    ("min-tier-string", line("f4", batchroute={"min_tier": "1"}),
     "batchroute.min_tier: must be a positive integer"),
    ("task-number", line("f5", batchroute={"task": 5}), "batchroute.task: unknown task 5"),
    ("pin-number", line("f6", batchroute={"pin": 7}), "batchroute.pin: 7 is neither"),
    ("url-null", line("f7", url=None), "url: only /v1/chat/completions is supported"),
    ("method-lowercase", line("f8", method="post"), "method: only POST is supported"),
    ("content-object", line("f9", body({"text": "hi"})), "body.messages[0].content: must be"),
    ("role-function", line("f10", {"model": "auto", "messages": [
        {"role": "function", "content": "hi"}]}), "body.messages[0].role: must be one of"),
    ("role-missing", line("f11", {"model": "auto", "messages": [{"content": "hi"}]}),
     "body.messages[0].role: must be one of"),
    ("validator-not-object", checks(5), "must be an object with a 'type'"),  # type: ignore[arg-type]
    ("validator-empty-type", checks({"type": ""}), "'type' must be a non-empty string"),
    ("choices-missing", checks({"type": "choices"}), "'choices' must be a non-empty list"),
    ("choices-only-quotes", checks({"type": "choices", "choices": ['""']}),
     "must not contain labels that are only quotes"),
    ("finish-reason-string", checks({"type": "finish_reason", "allowed": "stop"}),
     "'allowed' must be a non-empty list of strings"),
    ("max-length-no-limit", checks({"type": "max_length"}), "needs 'max_chars'"),
    ("max-length-zero", checks({"type": "max_length", "max_chars": 0}),
     "'max_chars' must be a positive integer"),
    ("logprob-threshold-probability", checks({"type": "logprob_confidence", "threshold": 0.8}),
     "must be <= 0"),
    ("validator-tiers-zero", checks({"type": "json", "tiers": [0]}),
     "'tiers' must be a non-empty list of tiers"),
    ("scorer-in-line", checks({"type": "scorer", "threshold": 0.5, "model_file": "/etc/x"}),
     "'scorer' checks are set in the routing config"),
    ("validator-misspelt-param", checks({"type": "choices", "choice": ["a"]}),
     "unknown parameter 'choice'"),
    ("consensus-k-one", checks({"type": "consensus", "k": 1}), "'k' (samples to compare)"),
    ("consensus-min-agree-above-k", checks({"type": "consensus", "k": 3, "min_agree": 4}),
     "'min_agree' (4) cannot exceed 'k' (3)"),
    ("json-schema-missing", checks({"type": "json_schema"}),
     "'schema' must be a JSON Schema object"),
    ("custom-type-shorthand-unknown", checks({"type": "my_check"}), "unknown type 'my_check'"),
]
