"""A redis-server of a test's own, on a free port and without persistence.

Reliability tests restart it empty to play a broker that forgot everything, and use it
so that no other test suite on the same machine can flush or consume their queues (a
message consumed by another suite's worker is acked and gone, which is exactly what these
tests must not have happening behind their back).
"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pings(client: Any) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class DedicatedRedis:
    def __init__(self, workdir: Path, *extra: str) -> None:
        self.port = free_port()
        self.dir = workdir
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> DedicatedRedis:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        wait_for(lambda: _pings(client), 10, "the dedicated redis-server to start", 0.05)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def own_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DedicatedRedis]:
    """A dedicated Redis (noeviction, no persistence) as this test's broker."""
    server = DedicatedRedis(tmp_path, "--maxmemory-policy", "noeviction").start()
    monkeypatch.setenv("BATCHROUTE_BROKER_URL", server.url)
    try:
        yield server
    finally:
        server.kill()
