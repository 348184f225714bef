"""A hostile OpenAI-compatible test server that echoes the caller's credentials.

Some providers quote the key they were sent in 401/400 bodies and headers; this one
always does, so tests can assert the key ends up nowhere. A prompt containing "auth"
gets a 401, one containing "bad" a 400, anything else a normal chat.completion.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *_: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        auth = self.headers.get("authorization", "")
        prompt = json.dumps(body.get("messages"))
        if "auth" in prompt:
            self._send(401, {"error": {"message": f"Incorrect API key provided: {auth!r}",
                                       "type": "invalid_request_error",
                                       "code": "invalid_api_key"}},
                       {"WWW-Authenticate": auth})
        elif "bad" in prompt:
            self._send(400, {"error": {"message": f"bad request sent with header {auth}",
                                       "type": "invalid_request_error", "code": "bad"}},
                       {"X-Echo": auth})
        else:
            self._send(200, {"id": "chatcmpl-1", "object": "chat.completion",
                             "model": body.get("model"),
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": "yes"}}],
                             "usage": {"prompt_tokens": 5, "completion_tokens": 1}},
                       {"X-Echo": auth})

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@contextmanager
def echo_server() -> Iterator[str]:
    """Serve on a free loopback port; yields the base URL (…/v1)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
