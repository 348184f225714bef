"""The pure parts of distrusting a reply: shape checks, token counts, billing, the capped
body reader, the total deadline and the Attempt.flags migration (end to end against a
hostile server: tests/test_hostile_replies.py)."""

from __future__ import annotations

import gzip
import math
import socket
import sqlite3
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchroute import store as store_module
from batchroute.billing import COST_CLAMP_FACTOR, bill, clamp_cost
from batchroute.completion import Completion, Usage
from batchroute.config import parse_config
from batchroute.providers import ErrorKind, ProviderError, call
from batchroute.providers.body import ReplyTooLarge, read_capped
from batchroute.providers.deadline import Watchdog
from batchroute.providers.reply import (
    MAX_DEPTH,
    MalformedReply,
    check_chat_completion,
    decode_json,
    token_count,
)

PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
CONFIG = parse_config({"providers": {"p": {"base_url": "http://127.0.0.1:9/v1"}},
                       "models": {"m": {"provider": "p", "tier": 1, "price": PRICE}}})
MODEL = CONFIG.models["m"]


# ---- decode + shape ----------------------------------------------------------------------
@pytest.mark.parametrize(("body", "says"), [
    (b"", "empty body"), (b"  \n", "empty body"),
    (b'{"a": "\xff"}', "not valid UTF-8"),
    (b'{"a": NaN}', "not JSON"), (b'{"a": Infinity}', "not JSON"),
    (b"<html>", "not JSON"), (b'{"choices": [', "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "nested deeper"),
])
def test_decode_json_refuses(body: bytes, says: str) -> None:
    with pytest.raises(MalformedReply, match=says):
        decode_json(body)


def test_decode_json_accepts_a_bom_and_max_depth() -> None:
    assert decode_json(b"\xef\xbb\xbf{}") == {}
    decode_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)


def _chat(**choice: Any) -> dict[str, Any]:
    base = {"index": 0, "message": {"role": "assistant", "content": "hi"},
            "finish_reason": "stop"}
    return {"choices": [base | choice]}


@pytest.mark.parametrize(("data", "says"), [
    ([], "not an object"), ({}, "choices is missing"), ({"choices": None}, "not a list"),
    ({"choices": []}, "empty"), ({"choices": [1]}, "not an object"),
    (_chat(message="hi"), "message is str"), (_chat(message=None), "message is NoneType"),
    ({"choices": [{"index": 0}]}, "message is missing"),
    (_chat(message={"content": 5}), "content is int"),
    (_chat(message={"content": ["a"]}), "content is list"),
    (_chat(finish_reason=7), "finish_reason is int"),
    (_chat(index="0"), "index is str"),
    (_chat(logprobs="junk"), "logprobs is str"),
    (_chat(logprobs={"content": "x"}), "logprobs.content is str"),
    (_chat(logprobs={"content": [1]}), r"logprobs.content\[0\] is not an object"),
    (_chat(logprobs={"content": [{"logprob": "x"}]}), "not a log-probability"),
    (_chat(logprobs={"content": [{"logprob": 3.0}]}), "not a log-probability"),
    (_chat(logprobs={"content": [{"logprob": True}]}), "not a log-probability"),
    (_chat() | {"usage": []}, "usage is list"),
    (_chat() | {"usage": {"prompt_tokens_details": 5}}, "prompt_tokens_details is int"),
])
def test_chat_completion_shape(data: Any, says: str) -> None:
    with pytest.raises(MalformedReply, match=says):
        check_chat_completion(data)


def test_a_null_content_and_real_logprobs_pass() -> None:
    check_chat_completion(_chat(message={"content": None, "tool_calls": []},
                                logprobs={"content": [{"token": "a", "logprob": -0.1}]}))


@pytest.mark.parametrize(("value", "expected"), [
    (0, 0), (12, 12), (2**31 - 1, 2**31 - 1), (2**31, None), (2**40, None), (-1, None),
    (1.0, None), (True, None), ("12", None), ([], None), (math.inf, None)])
def test_token_count(value: Any, expected: int | None) -> None:
    assert token_count(value) == expected


def test_missing_counts() -> None:
    assert token_count(None) == 0
    assert token_count(None, required=True) is None


# ---- billing -----------------------------------------------------------------------------
def _completion(prompt: int, completion: int, flags: tuple[str, ...] = (),
                content: str = "Hello there.") -> Completion:
    return Completion(content=content, finish_reason="stop", usage=Usage(prompt, completion),
                      model="m", flags=flags)


def test_a_believable_usage_is_billed_as_reported() -> None:
    b = bill(MODEL, _completion(12, 3), prompt_est=10, max_out=20, reserved_max=1.0)
    assert b.flags == () and b.usage == Usage(12, 3) and b.flags_text is None
    assert b.cost_usd == pytest.approx((12 + 6) / 1e6)


def test_suspect_usage_is_recounted() -> None:
    b = bill(MODEL, _completion(0, 0, ("usage_suspect",)), 10, 20, 1.0)
    assert b.flags == ("usage_suspect",) and b.usage == Usage(10, 3)  # "Hello there." = 3


def test_an_implausible_usage_is_recounted() -> None:
    b = bill(MODEL, _completion(50_000_000, 3), 10, 20, 1.0)
    assert b.flags == ("usage_suspect",) and b.usage.prompt_tokens == 10
    b = bill(MODEL, _completion(12, 5000), 10, 20, 1.0)
    assert b.flags == ("usage_suspect",) and b.usage.completion_tokens == 3


def test_cost_is_clamped_to_the_reservation_factor() -> None:
    reserved = (10 + 40) / 1e6
    b = bill(MODEL, _completion(90, 200), 10, 20, reserved)
    assert b.flags == ("cost_clamped",)
    assert b.cost_usd == pytest.approx(COST_CLAMP_FACTOR * reserved)
    assert b.flags_text == "cost_clamped"


@pytest.mark.parametrize("cost", [-1.0, -1e-9, math.nan, -math.inf])
def test_a_cost_is_never_negative(cost: float) -> None:
    assert clamp_cost(cost, 1.0) == (0.0, True)
    assert clamp_cost(math.inf, 1.0) == (COST_CLAMP_FACTOR, True)


def test_a_negative_price_cannot_produce_a_negative_cost() -> None:
    config = parse_config({"providers": {"p": {"base_url": "http://x/v1"}}, "models": {
        "m": {"provider": "p", "tier": 1,
              "price": {"input_per_mtok": -5.0, "output_per_mtok": 1.0}}}})
    b = bill(config.models["m"], _completion(12, 3), 10, 20, 1.0)
    assert b.cost_usd == 0.0 and "cost_clamped" in b.flags


# ---- the capped reader -------------------------------------------------------------------
def _response(data: bytes, **headers: str) -> httpx.Response:
    return httpx.Response(200, headers=headers, stream=httpx.ByteStream(data))


@pytest.mark.parametrize("wrap", [
    lambda d: (gzip.compress(d), "gzip"),
    lambda d: (zlib.compress(d), "deflate"),
    lambda d: (zlib.compress(d)[2:-4], "deflate"),  # raw deflate, as some servers send
    lambda d: (d, "identity"),
])
def test_read_capped_decodes(wrap: Any) -> None:
    data = b'{"ok": true}' * 100
    raw, enc = wrap(data)
    assert read_capped(_response(raw, **{"content-encoding": enc}), 10_000) == data


def test_a_gzip_bomb_stops_at_the_cap_without_inflating() -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=1)
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(ReplyTooLarge):
            read_capped(_response(bomb, **{"content-encoding": "gzip"}), 1024 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, peak  # never the 64 MB the bomb inflates to


def test_a_declared_length_past_the_cap_is_refused_unread() -> None:
    with pytest.raises(ReplyTooLarge):
        read_capped(_response(b"", **{"content-length": str(10**9)}), 1000)


def test_an_exact_cap_is_accepted_one_more_byte_is_not() -> None:
    assert len(read_capped(_response(b"a" * 1000), 1000)) == 1000
    with pytest.raises(ReplyTooLarge):
        read_capped(_response(b"a" * 1001), 1000)


# ---- the total deadline ------------------------------------------------------------------
def test_the_watchdog_cuts_a_blocked_read_and_survives_many_guards() -> None:
    dog = Watchdog()
    a, b = socket.socketpair()
    try:
        class Stream:
            def get_extra_info(self, name: str) -> Any:
                return a if name == "socket" else None

        for _ in range(1000):  # finished calls: disarmed, compacted away
            dog.arm(60).disarm()
        guard = dog.arm(0.2)
        guard.watch(Stream())
        started = time.monotonic()
        assert a.recv(10) == b""  # blocked until the watchdog shut the socket down
        assert guard.fired and 0.15 < time.monotonic() - started < 2
        assert len(dog._heap) < 600
    finally:
        a.close()
        b.close()


def test_a_trickled_body_ends_deadline_exceeded() -> None:
    """A server sending one byte every 0.2 s: each read is quick, the call is not."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    stop = threading.Event()

    def serve() -> None:
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        while not stop.is_set():
            try:
                conn.sendall(b" ")
            except OSError:
                break
            time.sleep(0.2)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/v1"
    config = parse_config({"providers": {"p": {"base_url": url, "timeout_s": 1.0,
                                               "deadline_factor": 1.0}},
                           "models": {"m": {"provider": "p", "tier": 1, "price": PRICE}}})
    started = time.monotonic()
    try:
        with httpx.Client() as client, pytest.raises(ProviderError) as e:
            call(client, config.providers["p"], url, "m",
                 {"messages": [{"role": "user", "content": "x"}]})
    finally:
        stop.set()
        srv.close()
    assert e.value.kind is ErrorKind.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3


# ---- Attempt.flags on a database written by an older version ------------------------------
def test_an_old_database_gains_the_flags_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    store_module.get_engine(url)
    with store_module._engines_lock:
        store_module._engines.pop(url).dispose()
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE attempt DROP COLUMN flags")
        assert "flags" not in [r[1] for r in conn.execute("PRAGMA table_info(attempt)")]
    store_module.get_engine(url)
    with sqlite3.connect(path) as conn:
        assert "flags" in [r[1] for r in conn.execute("PRAGMA table_info(attempt)")]


def test_the_watchdog_works_in_a_forked_child() -> None:
    """Celery's prefork pool forks after imports: the child needs its own thread."""
    import os

    from batchroute.providers.deadline import WATCHDOG

    WATCHDOG.arm(60).disarm()  # the parent's thread is running
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            guard = WATCHDOG.arm(0.05)
            time.sleep(0.5)
            code = 0 if guard.fired else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
