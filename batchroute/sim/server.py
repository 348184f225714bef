"""The simulator as a real HTTP server (stdlib only), so clients are tested over sockets.

A real server rather than an httpx mock transport: connection pooling, timeouts,
keep-alive and concurrency limits in the client are exactly what breaks in production,
and a mock would hide them. One thread per connection (ThreadingHTTPServer) lets
latency overlap the way it does at a real provider.

Runtime control (``/_sim/...``) lets tests reconfigure a sim started in another process,
e.g. by ``batchroute sim --port N``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import structlog

from batchroute.sim import batches
from batchroute.sim.config import SimBatch, SimConfig, SimConfigError, SimModel
from batchroute.sim.engine import SimEngine
from batchroute.sim.protocols import AnthropicProtocol, ApiError, OpenAIProtocol, Reply, json_reply

log = structlog.get_logger(__name__)

_OPENAI = OpenAIProtocol()
_ANTHROPIC = AnthropicProtocol()
_COMPLETION_PATHS: dict[str, OpenAIProtocol | AnthropicProtocol] = {
    "/v1/chat/completions": _OPENAI,
    "/chat/completions": _OPENAI,
    "/v1/messages": _ANTHROPIC,
    "/messages": _ANTHROPIC,
}
_MODELS_PREFIX = "/_sim/models/"
_REASONS = {529: "Overloaded"}
_MAX_BODY = 64 * 1024 * 1024
_MAX_BATCH_BODY = 300 * 1024 * 1024  # above both batch APIs' limits, so theirs are the ones hit


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a hanging request must never keep the process alive
    request_queue_size = 1024  # the default backlog of 5 refuses bursts of concurrent clients

    def __init__(self, address: tuple[str, int], engine: SimEngine,
                 batch_registry: batches.BatchRegistry) -> None:
        self.engine = engine
        self.batches = batch_registry
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, conn: socket.socket, add: bool) -> None:
        with self._connections_lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def close_connections(self) -> None:
        """Cut keep-alive connections on stop; otherwise their handler threads would keep
        answering pooled clients after the server is supposedly down."""
        with self._connections_lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return  # the client gave up (e.g. its timeout fired during an injected hang)
        log.warning("sim.handler_error", client=str(client_address), exc_info=True)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real providers; clients pool connections
    # Headers and body go out in separate writes; with Nagle on, each response would wait
    # ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True
    server_version = "batchroute-sim/0.1"
    sys_version = ""

    @property
    def _server(self) -> _HTTPServer:
        assert isinstance(self.server, _HTTPServer)
        return self.server

    def setup(self) -> None:
        super().setup()
        self._server.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._server.track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silenced: one line per request would drown test and benchmark output."""

    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            body = self._read_body(_MAX_BATCH_BODY if batches.is_batch_path(path)
                                   else _MAX_BODY)
        except (ValueError, OSError):
            self.close_connection = True
            self._send(json_reply(400, _openai_error("could not read the request body")))
            return
        try:
            reply = self._route(method, path, body)
        except Exception:  # a sim bug must answer 500, not hang the client
            log.exception("sim.internal_error", path=path)
            reply = json_reply(500, _openai_error("simulator internal error", "server_error"))
        self._send(reply)

    def _read_body(self, limit: int) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        if length < 0 or length > limit:
            raise ValueError("bad content-length")
        return self.rfile.read(length) if length else b""

    def _send(self, reply: Reply) -> None:
        try:
            self.send_response(reply.status, _REASONS.get(reply.status))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
            self.wfile.flush()
        except OSError:  # client went away (timed out, or the server is stopping)
            self.close_connection = True

    def _route(self, method: str, path: str, body: bytes) -> Reply:
        engine = self._server.engine
        protocol = _COMPLETION_PATHS.get(path)
        if protocol is not None:
            if method != "POST":
                return protocol.error(405, "method", f"{method} is not allowed on {path}")
            return self._complete(protocol, body)
        if path.startswith("/_sim/"):
            return self._control(method, path, body)
        if batches.is_batch_path(path):
            headers = {k.lower(): v for k, v in self.headers.items()}
            query = dict(parse_qsl(urlsplit(self.path).query))
            reply = batches.route(self._server.batches, method, path, body, headers, query)
            if reply is not None:
                return reply
        if path in ("/v1/models", "/models") and method == "GET":
            names = sorted(engine.config_dict()["models"])
            return json_reply(200, {"object": "list", "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "batchroute-sim"}
                for n in names
            ]})
        return json_reply(404, _openai_error(f"Unknown request URL: {method} {path}",
                                             "invalid_request_error", "unknown_url"))

    def _complete(self, protocol: OpenAIProtocol | AnthropicProtocol, body: bytes) -> Reply:
        engine = self._server.engine
        headers = {k.lower(): v for k, v in self.headers.items()}
        model: str | None = None
        try:
            protocol.check_auth(headers)
            try:
                data = json.loads(body or b"null")
            except ValueError:
                raise ApiError(400, "invalid_request", "could not parse the JSON body") from None
            if not isinstance(data, dict):
                raise ApiError(400, "invalid_request", "the request body must be a JSON object")
            model = data.get("model") if isinstance(data.get("model"), str) else None
            request = protocol.parse(data, headers)
        except ApiError as e:
            engine.count_request(protocol.name, model)
            reply = protocol.error(e.status, e.kind, e.message, e.param)
        else:
            engine.count_request(protocol.name, request.model)
            reply = protocol.render(engine.complete(request), request)
        engine.count_response(reply.status)
        return reply

    def _control(self, method: str, path: str, body: bytes) -> Reply:
        engine = self._server.engine
        if path == "/_sim/stats" and method == "GET":
            return json_reply(200, engine.stats())
        if path == "/_sim/health" and method == "GET":
            return json_reply(200, {"ok": True})
        if path == "/_sim/config" and method == "GET":
            return json_reply(200, engine.config_dict())
        if path == "/_sim/batch" and method in ("GET", "POST"):
            if method == "POST":
                try:
                    engine.set_batch(SimBatch.from_dict(json.loads(body or b"{}"), "body"))
                except (ValueError, SimConfigError) as e:
                    return json_reply(400, _openai_error(str(e)))
            return json_reply(200, engine.config_dict()["batch"])
        if path == "/_sim/reset" and method == "POST":
            engine.reset()
            return json_reply(200, {"ok": True})
        if path == "/_sim/default" or path.startswith(_MODELS_PREFIX):
            name = None if path == "/_sim/default" else unquote(path[len(_MODELS_PREFIX):])
            if name == "":
                return json_reply(404, _openai_error("missing model name in the URL"))
            if method == "GET":
                config = engine.config_dict()
                model = config["default"] if name is None else config["models"].get(name)
                if model is None:
                    return json_reply(404, _openai_error(f"model {name!r} is not configured"))
                return json_reply(200, model)
            if method == "POST":
                try:
                    data = json.loads(body or b"{}")
                    parsed = SimModel.from_dict(data, "body")
                except (ValueError, SimConfigError) as e:
                    return json_reply(400, _openai_error(str(e)))
                if name is None:
                    engine.set_default(parsed)
                else:
                    engine.set_model(name, parsed)
                log.info("sim.model_changed", model=name or "<default>", **parsed.to_dict())
                return json_reply(200, {"ok": True, "model": name, "config": parsed.to_dict()})
        return json_reply(404, _openai_error(f"Unknown simulator control URL: {method} {path}",
                                             "invalid_request_error", "unknown_url"))


def _openai_error(message: str, typ: str = "invalid_request_error",
                  code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": typ, "param": None, "code": code}}


class SimServer:
    """A simulated LLM provider listening on ``url``; use as a context manager in tests.

    ``port=0`` picks a free port at start(); the port is then kept, so a stopped server
    restarts at the same URL (useful to simulate a provider that goes down and comes back).
    """

    def __init__(self, config: SimConfig | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.engine = SimEngine(config if config is not None else SimConfig())
        self.batches = batches.BatchRegistry(self.engine)
        self.host = host
        self.port = port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL without trailing slash and without ``/v1``."""
        if self.port == 0:
            raise RuntimeError("SimServer(port=0) has no URL until start() picks a port")
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def config(self) -> SimConfig:
        """The live config; change it with set_model(), which is thread-safe."""
        return self.engine.config

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> SimServer:
        if self._httpd is not None:
            return self
        self.engine.stopping.clear()
        cls = _HTTPServer6 if ":" in self.host else _HTTPServer
        httpd = cls((self.host, self.port), self.engine, self.batches)
        self.port = int(httpd.server_address[1])
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"batchroute-sim-{self.port}", daemon=True,
        )
        self._thread.start()
        log.info("sim.started", url=self.url, models=sorted(self.engine.config.models))
        return self

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._httpd = self._thread = None
        self.engine.stopping.set()  # wakes requests sleeping in latency or a hang
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        if thread is not None:
            thread.join(timeout=5)
        log.info("sim.stopped", url=self.url)

    def join(self) -> None:
        """Block until stop() is called from another thread (or Ctrl-C)."""
        while (thread := self._thread) is not None and thread.is_alive():
            thread.join(0.5)

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """Counters since start or the last reset(), same JSON as ``GET /_sim/stats``.

        Keys: ``requests`` (completion calls, including rejected ones), ``by_model``,
        ``by_status`` and ``by_endpoint`` ("openai"/"anthropic") (string keys),
        ``refused_rpm``, ``refused_tpm``, ``faults`` (timeout, malformed, empty,
        content_filter, length, and ``error_<status>`` per injected HTTP error),
        ``answers`` (good/bad answers served), ``truncated_max_tokens`` and ``tokens``
        (prompt/completion tokens of 200 replies).
        """
        return self.engine.stats()

    def reset(self) -> None:
        self.engine.reset()

    def set_model(self, name: str, model: SimModel) -> None:
        self.engine.set_model(name, model)

    def set_default(self, model: SimModel) -> None:
        self.engine.set_default(model)

    def set_batch(self, settings: SimBatch) -> None:
        """Batch API behaviour (delay, expiry, limits) for batches created from now on."""
        self.engine.set_batch(settings)


def serve_forever(config: SimConfig, host: str = "127.0.0.1", port: int = 0) -> None:
    """Run a sim in the foreground until Ctrl-C (the ``batchroute sim`` command)."""
    server = SimServer(config, host, port).start()
    log.info("sim.listening", url=server.url, openai_base_url=f"{server.url}/v1")
    try:
        server.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
