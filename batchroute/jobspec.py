"""Parse and check one input line (OpenAI Batch API format + optional `batchroute` field).

Pure: bytes in, a JobSpec or a LineProblem out. Every rejection names the field,
so a user can fix line 48,211 of a 100k-line file without guessing; the caller
keeps going with the other lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from batchroute.config import Config
from batchroute.validators import (
    ValidatorError,
    validate_specs,
    validators_for_response_format,
)
from batchroute.validators.safety import (
    MAX_LINE_DEPTH,
    text_may_be_deep,
    tools_problem,
    unsendable,
    value_problem,
)

SUPPORTED_URLS = ("/v1/chat/completions", "/chat/completions")
#: Longest custom_id taken: it is a key in the store, the results and every log line,
#: and one of megabytes used to abort a PostgreSQL submit (index row too large).
MAX_CUSTOM_ID = 512
_SERIALISE_CHECK_MAX = 1 << 20
ROLES = ("system", "developer", "user", "assistant", "tool")


class LineProblem(ValueError):
    """A line that cannot become a job; str() is the reason shown to the user."""

    def __init__(self, reason: str, custom_id: str | None = None) -> None:
        super().__init__(reason)
        self.custom_id = custom_id


@dataclass
class JobSpec:
    custom_id: str
    body: dict[str, Any]
    task: str = "default"
    reference_model: str | None = None  # body.model unless "auto"
    min_tier: int | None = None
    max_tier: int | None = None
    pin: str | None = None
    validators: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def options(self) -> dict[str, Any]:
        """What the Job row keeps of the `batchroute` field."""
        return {"validators": self.validators, "metadata": self.metadata, "pin": self.pin,
                "min_tier": self.min_tier, "max_tier": self.max_tier}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (providers reject it); use a number or null")


def _decode(raw: bytes | str, line_no: int) -> Any:
    """Bytes to a JSON value. Hostile input (deep nesting, 10,000-digit numbers, NaN, lone
    surrogates) becomes a LineProblem here rather than an exception that would stop the
    ingestion or, worse, crash a worker when the body is sent."""
    if isinstance(raw, bytes):
        # A BOM starts the file, or any line of files joined with `cat a.jsonl b.jsonl`.
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LineProblem(f"invalid UTF-8 at byte {e.start}; save the file as UTF-8") from None
    else:
        text = raw.lstrip("\ufeff")
    # No rstrip: JSON allows the trailing "\r\n", and a copy of a line near the 8 MB cap
    # costs 8 MB more at the peak.
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise LineProblem(f"invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise LineProblem("invalid JSON: nested too deeply") from None
    except ValueError as e:  # NaN/Infinity, integers beyond Python's digit limit
        raise LineProblem(f"invalid JSON: {str(e)[:200]}") from None
    # Nesting the parser survives can still blow the recursion limit of whatever walks the
    # line next (json.dumps, jsonschema, the store), and PostgreSQL refuses NUL characters:
    # both are this line's error, checked without recursion (and only when they can occur).
    if text_may_be_deep(text) or "\\u0000" in text:
        problem = value_problem(obj, MAX_LINE_DEPTH)
        if problem is not None:
            what = "invalid JSON" if problem.startswith("nested") else "invalid text"
            raise LineProblem(f"{what}: {problem}") from None
    # What the provider call will do with the body: fail here, not on a worker. Small lines
    # are serialised (C speed); large ones walked, not copied twice more.
    if len(text) <= _SERIALISE_CHECK_MAX:
        try:
            json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
            problem = None
        except UnicodeEncodeError:
            problem = "surrogate"
        except (ValueError, RecursionError):
            problem = "number"
    else:
        problem = unsendable(obj)
    if problem == "surrogate":
        raise LineProblem("invalid text: a \\u escape encodes a lone surrogate, which is not "
                          "valid Unicode and cannot be sent") from None
    if problem is not None:
        raise LineProblem("invalid JSON: a number is out of range (e.g. 1e999)") from None
    return obj


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise LineProblem("body.messages: must be a non-empty list of messages")
    for i, m in enumerate(messages):
        where = f"body.messages[{i}]"
        if not isinstance(m, dict):
            raise LineProblem(f"{where}: must be an object with role and content")
        if m.get("role") not in ROLES:
            raise LineProblem(f"{where}.role: must be one of {', '.join(ROLES)}, "
                              f"got {m.get('role')!r}")
        content = m.get("content")
        empty_assistant = content is None and m["role"] == "assistant"
        if not isinstance(content, (str, list)) and not empty_assistant:
            raise LineProblem(f"{where}.content: must be a string or a list of content parts")


def _opt_int(opts: dict[str, Any], key: str) -> int | None:
    value = opts.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LineProblem(f"batchroute.{key}: must be a positive integer, got {value!r}")
    return value


def parse_line(raw: bytes | str, line_no: int, config: Config) -> JobSpec:
    """Parse one line; raise LineProblem with a reason naming the field."""
    obj = _decode(raw, line_no)
    if not isinstance(obj, dict):
        raise LineProblem(f"expected a JSON object, got {type(obj).__name__}")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id.strip():
        raise LineProblem("custom_id: required, a non-empty string")
    if len(custom_id) > MAX_CUSTOM_ID:
        raise LineProblem(f"custom_id: {len(custom_id)} characters long, at most "
                          f"{MAX_CUSTOM_ID} allowed")
    try:
        return _parse_obj(obj, custom_id, config)
    except LineProblem as e:
        e.custom_id = custom_id
        raise


def _parse_obj(obj: dict[str, Any], custom_id: str, config: Config) -> JobSpec:
    method = obj.get("method", "POST")
    if method != "POST":
        raise LineProblem(f"method: only POST is supported, got {method!r}")
    url = obj.get("url", "/v1/chat/completions")
    if url not in SUPPORTED_URLS:
        raise LineProblem(f"url: only /v1/chat/completions is supported, got {url!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineProblem("body: required, an object (the chat-completions request)")
    _check_messages(body.get("messages"))
    model = body.get("model", "auto")
    if not isinstance(model, str):
        raise LineProblem(f"body.model: must be a string, got {model!r}")
    problem = tools_problem(body.get("tools"))
    if problem is not None:
        raise LineProblem(f"body.tools: the parameters schema {problem}")
    for key in ("max_tokens", "max_completion_tokens"):
        if key in body and (not isinstance(body[key], int) or isinstance(body[key], bool)
                            or body[key] < 1):
            raise LineProblem(f"body.{key}: must be a positive integer, got {body[key]!r}")

    opts = obj.get("batchroute") or {}
    if not isinstance(opts, dict):
        raise LineProblem("batchroute: must be an object")
    task = opts.get("task", "default")
    if not isinstance(task, str) or task not in config.tasks:
        raise LineProblem(f"batchroute.task: unknown task {task!r} "
                          f"(known: {', '.join(sorted(config.tasks))})")
    pin = opts.get("pin")
    if pin is not None and (not isinstance(pin, str)
                            or (pin not in config.models and pin not in config.providers)):
        raise LineProblem(f"batchroute.pin: {pin!r} is neither a configured model nor provider")
    validators = opts.get("validators", [])
    if not isinstance(validators, list):
        raise LineProblem("batchroute.validators: must be a list")
    if any(isinstance(v, dict) and v.get("type") == "scorer" for v in validators):
        # A scorer names a weight file on the workers: job lines are untrusted input.
        raise LineProblem("batchroute.validators: 'scorer' checks are set in the routing "
                          "config (batchroute calibrate writes them), not in job lines")
    try:
        validate_specs(validators, config.custom_validators)
        implied = validators_for_response_format(body.get("response_format"))
        validate_specs(implied)
    except ValidatorError as e:
        raise LineProblem(f"batchroute.{e}") from None
    metadata = opts.get("metadata", {})
    if not isinstance(metadata, dict):
        raise LineProblem("batchroute.metadata: must be an object")
    have = {v.get("type") for v in validators}
    return JobSpec(
        custom_id=custom_id,
        body=body,
        task=task,
        reference_model=None if model == "auto" else model,
        min_tier=_opt_int(opts, "min_tier"),
        max_tier=_opt_int(opts, "max_tier"),
        pin=pin,
        validators=list(validators) + [v for v in implied if v["type"] not in have],
        metadata=metadata,
    )
