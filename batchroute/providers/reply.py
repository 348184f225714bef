"""Strict checks of a provider's 2xx reply body, before anything reads a field of it.

Why a module of its own: a reply comes from outside and used to be trusted field by
field (`int(usage["prompt_tokens"])`, `msg.get(...)` on a string `message`,
`float(logprob)`), so one odd body crashed `run` or lost a worker with its cause
unrecorded. Here every shape rule is checked in one pure pass and a broken reply
becomes one `MalformedReply` with a reason, which the caller turns into the
`malformed_reply` error kind (retry / failover like any transient provider fault).

Token counts are not shape rules: an implausible count does not make the answer
unusable, it makes the provider's bill untrustworthy. `token_count` says which counts
are usable; the pipeline recounts the rest with tiktoken (batchroute.billing).
"""

from __future__ import annotations

import json
import math
from typing import Any

# Deeper than any real chat completion (tool-call arguments are a JSON *string*); deep
# nesting is what makes json / JSON columns / structlog recurse past Python's limit.
MAX_DEPTH = 64
# Counts at or beyond this do not fit PostgreSQL's INTEGER column nor any real context.
MAX_TOKENS = 2**31 - 1


class MalformedReply(ValueError):
    """The reply breaks the API's shape; the message says how (recorded on the attempt)."""


def decode_json(content: bytes) -> Any:
    """The body as JSON: strict UTF-8 (a leading BOM allowed), nesting bounded."""
    if not content.strip():
        raise MalformedReply("empty body")
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MalformedReply(f"body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise MalformedReply(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:
        snippet = text[:60].replace("\n", " ")
        raise MalformedReply(f"body is not JSON ({e}; starts {snippet!r})") from None
    if content.count(b"[") + content.count(b"{") > MAX_DEPTH:  # else it cannot be deeper
        check_depth(data)
    return data


def _no_constant(name: str) -> Any:
    # NaN / Infinity are not JSON, and PostgreSQL's JSON columns refuse them on write.
    raise ValueError(f"{name} is not a JSON value")


def check_depth(data: Any, limit: int = MAX_DEPTH) -> None:
    """Iterative (never recursive) walk; raises past `limit` levels of arrays/objects."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise MalformedReply(f"JSON nested deeper than {limit} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))


def token_count(value: Any, required: bool = False) -> int | None:
    """A usable token count (an int, not a bool, 0 <= n < 2^31), else None (suspect).
    A missing optional count (cached tokens) is 0; a missing required one (prompt,
    completion) is suspect: a call billed at $0 because usage was left out is a wrong bill."""
    if value is None:
        return None if required else 0
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_TOKENS else None


def _need(cond: bool, reason: str) -> None:
    if not cond:
        raise MalformedReply(reason)


def _type(value: Any) -> str:
    return type(value).__name__


def _check_logprobs(lp: Any, where: str) -> None:
    if lp is None:
        return
    _need(isinstance(lp, dict), f"{where}.logprobs is {_type(lp)}, not an object")
    content = lp.get("content")
    if content is None:
        return
    _need(isinstance(content, list), f"{where}.logprobs.content is {_type(content)}, not a list")
    for i, token in enumerate(content):
        _need(isinstance(token, dict), f"{where}.logprobs.content[{i}] is not an object")
        value = token.get("logprob", 0.0)
        _need(isinstance(value, int | float) and not isinstance(value, bool)
              and not math.isnan(value) and value <= 1e-3,  # rounding may give +0.000001
              f"{where}.logprobs.content[{i}].logprob is {value!r}, not a log-probability")


def _check_choice(choice: Any, where: str) -> None:
    _need(isinstance(choice, dict), f"{where} is {_type(choice)}, not an object")
    _need("message" in choice, f"{where}.message is missing")
    msg = choice["message"]
    _need(isinstance(msg, dict), f"{where}.message is {_type(msg)}, not an object")
    content = msg.get("content")
    _need(content is None or isinstance(content, str),
          f"{where}.message.content is {_type(content)}, not a string or null")
    finish = choice.get("finish_reason")
    _need(finish is None or isinstance(finish, str),
          f"{where}.finish_reason is {_type(finish)}, not a string")
    index = choice.get("index", 0)
    _need(isinstance(index, int) and not isinstance(index, bool),
          f"{where}.index is {_type(index)}, not an integer")
    _check_logprobs(choice.get("logprobs"), where)


def _check_usage(usage: Any, where: str = "usage") -> None:
    """Only the container's shape: the counts themselves go through `token_count`."""
    _need(usage is None or isinstance(usage, dict), f"{where} is {_type(usage)}, not an object")
    if isinstance(usage, dict):
        for key in ("prompt_tokens_details", "completion_tokens_details"):
            details = usage.get(key)
            _need(details is None or isinstance(details, dict),
                  f"{where}.{key} is {_type(details)}, not an object")


def check_chat_completion(data: Any) -> None:
    """An OpenAI ``chat.completion`` object, as far as we read it."""
    _need(isinstance(data, dict), f"body is a JSON {_type(data)}, not an object")
    _need("choices" in data, "choices is missing")
    choices = data["choices"]
    _need(isinstance(choices, list), f"choices is {_type(choices)}, not a list")
    _need(len(choices) > 0, "choices is empty")
    for i, choice in enumerate(choices):
        _check_choice(choice, f"choices[{i}]")
    _check_usage(data.get("usage"))


def check_messages_reply(data: Any) -> None:
    """An Anthropic Messages API reply, as far as we read it."""
    _need(isinstance(data, dict), f"body is a JSON {_type(data)}, not an object")
    _need("content" in data, "content is missing")
    blocks = data["content"]
    _need(isinstance(blocks, list), f"content is {_type(blocks)}, not a list")
    for i, block in enumerate(blocks):
        _need(isinstance(block, dict), f"content[{i}] is {_type(block)}, not an object")
        if block.get("type") == "text":
            _need(isinstance(block.get("text"), str),
                  f"content[{i}].text is {_type(block.get('text'))}, not a string")
    stop = data.get("stop_reason")
    _need(stop is None or isinstance(stop, str), f"stop_reason is {_type(stop)}, not a string")
    _check_usage(data.get("usage"))


def field_str(value: Any, limit: int = 200) -> str:
    """A scalar identifier (id, model) as a short string, whatever the provider sent."""
    return value[:limit] if isinstance(value, str) else ""
