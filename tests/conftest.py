"""Shared fixtures: real Redis, real Celery workers, real SQLite files, the simulator over HTTP.

Integration tests use a Redis database of their own (BATCHROUTE_TEST_REDIS_DB,
default 13) and flush it, so they never touch data on db 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "jobs" / "examples" / "support_batch.jsonl"
REDIS_DB = int(os.environ.get("BATCHROUTE_TEST_REDIS_DB", "13"))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test gets its own SQLite file and no stray config from the developer's shell."""
    monkeypatch.setenv("BATCHROUTE_DATABASE_URL", f"sqlite:///{tmp_path / 'test.db'}")
    monkeypatch.setenv("BATCHROUTE_BROKER_URL", REDIS_URL)
    monkeypatch.delenv("BATCHROUTE_CONFIG", raising=False)


@pytest.fixture
def redis_url() -> str:
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as e:  # pragma: no cover - .ci/run starts Redis
        raise RuntimeError(f"Redis is not running at {REDIS_URL}: start it "
                           "(redis-server --daemonize yes) — integration tests need it") from e
    client.flushdb()
    return REDIS_URL


class WorkerProcess:
    """A real `celery -A workers worker` in a subprocess, with its own env."""

    def __init__(self, env: dict[str, str], log_path: Path, concurrency: int = 16,
                 queues: str | None = None) -> None:
        cmd = [sys.executable, "-m", "celery", "-A", "workers", "worker", "--pool", "threads",
               "-c", str(concurrency), "--without-gossip", "--without-mingle", "-l", "WARNING",
               "-n", f"test{os.getpid()}.{time.monotonic_ns()}@%h"]
        if queues:
            cmd += ["-Q", queues]
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.wait(timeout=5)
        self._log.close()


@pytest.fixture
def start_worker(redis_url: str, tmp_path: Path) -> Iterator[object]:
    workers: list[WorkerProcess] = []

    def start(concurrency: int = 16, queues: str | None = None, **extra_env: str,
              ) -> WorkerProcess:
        env = {**os.environ, "BATCHROUTE_BROKER_URL": redis_url,
               "BATCHROUTE_LOG_FORMAT": "json", **extra_env}
        w = WorkerProcess(env, tmp_path / f"worker{len(workers)}.log", concurrency, queues)
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.stop()


def wait_for(predicate: object, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
