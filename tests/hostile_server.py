"""A hostile provider: an HTTP server whose every path answers in a broken way.

Started like the simulator (`with HostileServer() as h: h.url`), in a thread. The first
path segment names the behaviour: a provider configured with base_url
``{h.url}/usage-negative/v1`` gets negative token counts, and so on. Every reply is
``Connection: close`` (HTTP/1.0), so each call opens its own connection, as a remote
provider behind a load balancer often makes it do.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MB = 1024 * 1024
BIG = 200 * MB
TRICKLE_EVERY_S = 0.5  # the per-read timeout the tests use is longer: it never fires
TRICKLE_FOR_S = 20.0  # a trickle the client did not cut ends here (the test then fails)

Reply = tuple[int, dict[str, str], bytes | Callable[[], Iterator[bytes]]]


def chat(content: Any = "Hello there.", usage: Any = ..., **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-hostile", "object": "chat.completion", "created": 1, "model": "hostile",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
        if usage is ... else usage,
    }
    body.update(extra)
    return body


def messages_reply(content: Any = ..., usage: Any = ..., **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "msg_hostile", "type": "message", "role": "assistant", "model": "hostile",
        "content": [{"type": "text", "text": "Hello there."}] if content is ... else content,
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 12, "output_tokens": 3} if usage is ... else usage,
    }
    body.update(extra)
    return body


def _usage(prompt: Any, completion: Any = 3) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": 0}


def _json(data: Any, status: int = 200, **headers: str) -> Reply:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(data).encode()


def _raw(data: bytes, status: int = 200, ctype: str = "application/json",
         encoding: str | None = None) -> Reply:
    headers = {"Content-Type": ctype}
    if encoding:
        headers["Content-Encoding"] = encoding
    return status, headers, data


def _retry_after(value: str) -> Callable[[int], Reply]:
    """A 429 with this Retry-After on the first call, an answer on the next."""
    def reply(n: int) -> Reply:
        if n == 1:
            return _json({"error": {"message": "slow down", "type": "rate_limit_error"}}, 429,
                         **{"Retry-After": value})
        return _json(chat())
    return reply


def _stream(total: int, piece: bytes = b" " * 65536) -> Callable[[], Iterator[bytes]]:
    def gen() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            chunk = piece[:total - sent]
            sent += len(chunk)
            yield chunk
    return gen


def _big_valid() -> Iterator[bytes]:
    """A well-formed chat.completion whose answer is 200 MB of text."""
    head, tail = json.dumps(chat(content="@")).encode().split(b"@")
    yield head
    yield from _stream(BIG - len(head) - len(tail), b"a" * 65536)()
    yield tail


def _trickle() -> Iterator[bytes]:
    body = json.dumps(chat()).encode()
    end = time.monotonic() + TRICKLE_FOR_S
    for i in range(len(body)):
        if time.monotonic() > end:
            return
        yield body[i:i + 1]
        time.sleep(TRICKLE_EVERY_S)


_bomb_cache: list[bytes] = []


def gzip_bomb() -> bytes:
    """200 MB of zeros, gzip'd to about 200 KB (built once, ~0.5 s)."""
    if not _bomb_cache:
        c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        block = b"\0" * MB
        parts = [c.compress(block) for _ in range(BIG // MB)]
        _bomb_cache.append(b"".join(parts) + c.flush())
    return _bomb_cache[0]


def _nested(depth: int) -> bytes:
    return b'{"choices": ' + b"[" * depth + b"]" * depth + b"}"


# behaviour -> reply (or a callable of the request's attempt count at this behaviour)
BEHAVIOURS: dict[str, Callable[[int], Reply]] = {
    # a well-behaved reply, the baseline every hostile one is compared with
    "ok": lambda n: _json(chat()),
    # --- token counts ---
    "usage-negative": lambda n: _json(chat(usage=_usage(-1_000_000, -5))),
    "usage-2p40": lambda n: _json(chat(usage=_usage(2**40, 2**40))),
    "usage-2p31": lambda n: _json(chat(usage=_usage(2**31))),
    "usage-float": lambda n: _json(chat(usage=_usage(12.5, 3.7))),
    "usage-string": lambda n: _json(chat(usage=_usage("12", "3"))),
    "usage-bool": lambda n: _json(chat(usage=_usage(True, False))),
    "usage-implausible": lambda n: _json(chat(usage=_usage(50_000_000, 40_000_000))),
    "usage-missing": lambda n: _json(chat(usage=None)),
    "usage-not-object": lambda n: _json(chat(usage="lots")),
    "usage-cached-junk": lambda n: _json(chat(usage={
        **_usage(12), "prompt_tokens_details": {"cached_tokens": -7}})),
    "usage-over-reservation": lambda n: _json(chat(usage=_usage(90, 200))),
    # --- shape ---
    "invalid-utf8": lambda n: _raw(b'{"choices": [{"message": {"content": "\xff\xfe bad"}}]}'),
    "message-string": lambda n: _json({**chat(), "choices": [{"index": 0, "message": "hi",
                                                              "finish_reason": "stop"}]}),
    "content-number": lambda n: _json(chat(content=42)),
    "content-object": lambda n: _json(chat(content={"text": "hi"})),
    "logprobs-junk": lambda n: _json({**chat(), "choices": [{
        "index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop",
        "logprobs": {"content": [{"token": "hi", "logprob": "very likely"}]}}]}),
    "logprobs-not-object": lambda n: _json({**chat(), "choices": [{
        "index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop",
        "logprobs": [1, 2, 3]}]}),
    "choices-missing": lambda n: _json({"id": "x", "usage": _usage(1)}),
    "choices-empty": lambda n: _json(chat() | {"choices": []}),
    "choices-not-list": lambda n: _json(chat() | {"choices": {"0": {"message": {}}}}),
    "choice-not-object": lambda n: _json(chat() | {"choices": ["hi"]}),
    "body-array": lambda n: _json([chat()]),
    "html-200": lambda n: _raw(b"<html><body>Service temporarily unavailable</body></html>",
                               ctype="text/html"),
    "empty-200": lambda n: _raw(b""),
    "truncated-json": lambda n: _raw(json.dumps(chat()).encode()[:40]),
    "nan-usage": lambda n: _raw(b'{"choices": [{"message": {"content": "hi"}}], '
                                b'"usage": {"prompt_tokens": NaN, "completion_tokens": 1}}'),
    "wrong-content-type": lambda n: _raw(json.dumps(chat()).encode(), ctype="text/plain"),
    "deep-nested": lambda n: _raw(_nested(100_000)),
    "nested-100": lambda n: _json(chat(extra=json.loads(_nested(100)))),
    # --- size ---
    "big-declared": lambda n: (200, {"Content-Type": "application/json",
                                     "Content-Length": str(BIG)}, _stream(BIG)),
    "big-chunked": lambda n: (200, {"Content-Type": "application/json"}, _stream(BIG)),
    "big-valid": lambda n: (200, {"Content-Type": "application/json"}, _big_valid),
    "gzip-bomb": lambda n: _raw(gzip_bomb(), encoding="gzip"),
    "gzip-corrupt": lambda n: _raw(gzip.compress(json.dumps(chat()).encode())[:-12] + b"junk"
                                   * 3, encoding="gzip"),
    "gzip-ok": lambda n: _raw(gzip.compress(json.dumps(chat()).encode()),
                              encoding="gzip"),
    # --- time ---
    "trickle-body": lambda n: (200, {"Content-Type": "application/json"}, _trickle),
    "trickle-headers": lambda n: (200, {"X-Trickle-Headers": "1"}, b""),
    # --- error replies that are themselves broken ---
    "error-500-invalid-utf8": lambda n: _raw(b"\xff\xfe\xfd oops", status=500),
    "error-400-error-string": lambda n: _json({"error": "boom"}, status=400),
    # --- Retry-After: the first call is a 429 with the header, the retry answers ---
    **{f"retry-after-{name}": _retry_after(value)
       for name, value in (("huge", "999999999"), ("inf", "inf"), ("nan", "nan"),
                           ("negative", "-30"), ("garbage", "soon-ish"),
                           ("1e308", "1e308"))},
    # --- Anthropic-shaped ---
    "anth-ok": lambda n: _json(messages_reply()),
    "anth-usage-negative": lambda n: _json(messages_reply(
        usage={"input_tokens": -500, "output_tokens": -3})),
    "anth-usage-huge": lambda n: _json(messages_reply(
        usage={"input_tokens": 2**40, "output_tokens": 1.5})),
    "anth-content-string": lambda n: _json(messages_reply(content="Hello there.")),
    "anth-text-not-string": lambda n: _json(messages_reply(
        content=[{"type": "text", "text": {"nested": True}}])),
    "anth-invalid-utf8": lambda n: _raw(b'{"content": [{"type": "text", "text": "\xc3\x28"}]}'),
}


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        behaviour = self.path.strip("/").split("/")[0]
        n = self.server.count(behaviour)
        maker = BEHAVIOURS.get(behaviour)
        if maker is None:
            status, headers, body = _json({"error": {"message": f"no {behaviour}"}}, 404)
        else:
            status, headers, body = maker(n)
        try:
            if headers.pop("X-Trickle-Headers", None):
                self._trickle_headers()
                return
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if isinstance(body, bytes):
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.end_headers()
                for chunk in body():
                    self.wfile.write(chunk)
                    self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the client gave up on us, as it should

    def _trickle_headers(self) -> None:
        head = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nX-Padding: " + b"a" * 200
        end = time.monotonic() + TRICKLE_FOR_S
        for i in range(len(head)):
            if time.monotonic() > end:
                return
            self.wfile.write(head[i:i + 1])
            self.wfile.flush()
            time.sleep(TRICKLE_EVERY_S)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a whole batch connects at once: no SYN dropped

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, behaviour: str) -> int:
        with self._lock:
            self._counts[behaviour] = self._counts.get(behaviour, 0) + 1
            return self._counts[behaviour]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up mid-reply is the point of several behaviours


class HostileServer:
    def __init__(self) -> None:
        self._server = _Server()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="hostile-server")

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def calls(self, behaviour: str) -> int:
        return self._server._counts.get(behaviour, 0)

    def reset(self) -> None:
        with self._server._lock:
            self._server._counts.clear()

    def start(self) -> HostileServer:
        gzip_bomb()  # built before the first call, so no call waits on it
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # a hostile provider for manual runs and benchmarks/hostile_rss.py
    import sys

    server = HostileServer().start()
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        sys.exit(0)
