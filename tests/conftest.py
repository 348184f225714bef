"""Shared fixtures: real Redis, real Celery workers, real SQLite files and PostgreSQL
databases, the simulator over HTTP.

Integration tests use a Redis database of their own (BATCHROUTE_TEST_REDIS_DB,
default 13) and flush it, so they never touch data on db 0.

Every test marked `integration` runs twice, on SQLite and on PostgreSQL (the production
store): each PostgreSQL run gets a fresh database on BATCHROUTE_TEST_POSTGRES_URL
(default postgresql://postgres@127.0.0.1:5432/postgres), dropped afterwards. Without a
reachable server the PostgreSQL runs are skipped, except under CI, where they fail.
BATCHROUTE_TEST_DATABASE=sqlite (or postgresql) runs one store only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "jobs" / "examples" / "support_batch.jsonl"
# Outside CI, each pytest process picks one of dbs 1-15 by pid, so two suites run side by
# side (several developers on one machine) do not flush each other's queues.
REDIS_DB = int(os.environ.get("BATCHROUTE_TEST_REDIS_DB")
               or ("13" if os.environ.get("CI") else str(1 + os.getpid() % 15)))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"


PG_ADMIN_URL = os.environ.get("BATCHROUTE_TEST_POSTGRES_URL",
                              "postgresql://postgres@127.0.0.1:5432/postgres")
_pg_state: dict[str, object] = {}


def _stores() -> list[str]:
    only = os.environ.get("BATCHROUTE_TEST_DATABASE", "").strip().lower()
    if only in ("sqlite", "postgresql", "postgres"):
        return ["postgresql" if only.startswith("postgres") else "sqlite"]
    return ["sqlite", "postgresql"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Integration tests run on each store; the others on SQLite only (they test logic,
    not the database)."""
    if "db_url" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
            "integration"):
        metafunc.parametrize("db_url", _stores(), indirect=True)


def _pg_unreachable() -> str | None:
    """Why PostgreSQL cannot be used (checked once per session), or None."""
    if "problem" not in _pg_state:
        try:
            import psycopg2

            psycopg2.connect(PG_ADMIN_URL, connect_timeout=5).close()
            _pg_state["problem"] = None
        except Exception as e:  # ImportError, OperationalError: either way, no PostgreSQL
            _pg_state["problem"] = f"PostgreSQL at {PG_ADMIN_URL} is not usable: {e}".strip()
    return _pg_state["problem"]  # type: ignore[return-value]


def _pg_admin(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN_URL, connect_timeout=10)
    try:
        conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The test's store: a SQLite file, or (param "postgresql") a fresh database."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    problem = _pg_unreachable()
    if problem:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{problem} (CI must run the integration tests on PostgreSQL too; "
                        ".ci/run starts it)")
        pytest.skip(problem)
    from sqlalchemy.engine import make_url

    from batchroute import store as store_module

    _pg_state["n"] = int(_pg_state.get("n", 0)) + 1  # type: ignore[call-overload]
    name = f"batchroute_test_{os.getpid()}_{_pg_state['n']}"
    _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _pg_admin(f'CREATE DATABASE "{name}"')
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    store_module.get_engine(url)  # tables first, before any worker process starts
    try:
        yield url
    finally:
        with store_module._engines_lock:  # this process's pooled connections (both pools)
            engines = [store_module._engines.pop(k) for k in list(store_module._engines)
                       if k.split("#")[0].endswith(f"/{name}")]
        for engine in engines:
            engine.dispose()
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, db_url: str) -> None:
    """Every test gets its own store (a SQLite file, or a PostgreSQL database for the
    PostgreSQL run of an integration test) and no stray config from the developer's shell."""
    monkeypatch.setenv("BATCHROUTE_DATABASE_URL", db_url)
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
        # The node name as Celery expands it (%h: this host's name), so a control command
        # can address this worker and return on its reply, not after the whole timeout.
        self.name = f"test{os.getpid()}.{time.monotonic_ns()}@{socket.gethostname()}"
        cmd = [sys.executable, "-m", "celery", "-A", "workers", "worker", "--pool", "threads",
               "-c", str(concurrency), "--without-gossip", "--without-mingle", "-l", "WARNING",
               "-n", self.name]
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
