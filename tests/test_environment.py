"""The environment (#15): Flower never answers the network without auth; a PostgreSQL that
runs out of connections or restarts mid-batch loses no job; a Client built before a
prefork fork works in the children; JobHandle.wait's timeout is a hard bound."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc

from batchroute import dbretry, flower_guard
from batchroute.cli import main
from batchroute.store import FINISHED, Store, engine_url, get_engine

from .conftest import ROOT, wait_for
from .dedicated_redis import free_port
from .test_reliability import make_batch


def _sim_config(path: Path, latency_ms: int) -> Path:
    parts = ['[providers.sim]\nkind = "openai"\nbase_url = "sim://"\ntimeout_s = 10\n']
    for size, tier, ref in (("small", 1, "gpt-4o-mini"), ("medium", 2, "gpt-4.1-mini"),
                            ("large", 3, "gpt-4o")):
        parts.append(f'[models.sim-{size}]\nprovider = "sim"\ntier = {tier}\n'
                     f'price_ref = "{ref}"\nprice_provider = "openai"\n')
    for task in ("default", "classify"):
        parts.append(f'[tasks.{task}]\nladder = [1, 2, 3]\n'
                     'validators = [{ type = "non_empty" }]\n')
    parts.append(f"[simulator]\nseed = 3\n[simulator.default]\nfail_rate = 0.0\n"
                 f"latency_ms = {latency_ms}\n")
    path.write_text("\n".join(parts))
    return path


# ---- Flower -------------------------------------------------------------------------------------
def _listening(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.add(addr)
    return found


def _flower(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers", "flower", *args],
                            cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_flower_without_auth_listens_on_loopback_only_and_refuses_other_addresses(
        redis_url: str, tmp_path: Path) -> None:
    """Flower started for real (once: it does not touch the store)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    env |= {"PYTHONPATH": str(ROOT), "BATCHROUTE_BROKER_URL": redis_url}
    env.pop(flower_guard.ALLOW_ENV, None)
    port = free_port()
    log = tmp_path / "flower.log"
    proc = _flower([f"--port={port}"], env, log)  # no --address: Flower's default is all
    try:
        wait_for(lambda: _listening(port), 40, f"flower to listen; log:\n{log.read_text()}")
        assert _listening(port) == {"0100007F"}, _listening(port)  # 127.0.0.1 only
        assert "no authentication" in log.read_text()
    finally:
        _stop(proc)
    # An explicit non-loopback address without auth: refused, nothing listens.
    port = free_port()
    refused = _flower([f"--port={port}", "--address=0.0.0.0"], env, tmp_path / "refused.log")
    try:
        assert refused.wait(timeout=40) == 2
    finally:
        _stop(refused)
    assert "refusing to start Flower on 0.0.0.0" in (tmp_path / "refused.log").read_text()
    assert not _listening(port)


def test_flower_guard_decisions() -> None:
    d = flower_guard.decide
    assert d("", True, False, False) == flower_guard.Decision("")  # auth: untouched
    assert d("", False, False, False).address == "127.0.0.1"
    assert d("::1", False, False, False).refuse is None
    assert d("10.0.0.5", False, False, False).refuse
    assert d("flower.example.com", False, False, False).refuse  # a name may resolve anywhere
    allowed = d("0.0.0.0", False, False, True)
    assert allowed.refuse is None and allowed.warning and allowed.address == "0.0.0.0"


# ---- transient database errors ------------------------------------------------------------------
def test_transient_database_errors_are_told_apart_from_permanent_ones(tmp_path: Path) -> None:
    dead = create_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/x")
    with pytest.raises(sa_exc.OperationalError) as refused:
        dead.connect()
    assert dbretry.is_transient(refused.value)
    lite = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with lite.begin() as conn:
        conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
    for statement in ("INSERT INTO t VALUES (1)", "SELECT * FROM missing"):
        with pytest.raises(sa_exc.DBAPIError) as permanent, lite.begin() as conn:
            conn.execute(text(statement))
        assert not dbretry.is_transient(permanent.value), statement
    assert not dbretry.is_transient(ValueError("connection refused"))


def test_with_retry_waits_out_transient_errors_within_its_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    dead = create_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/x")
    calls: list[float] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            dead.connect()  # a real "connection refused"
        return "ok"

    assert dbretry.with_retry(flaky) == "ok" and len(calls) == 3
    monkeypatch.setenv("BATCHROUTE_DB_RETRY_S", "0.5")
    started = time.monotonic()
    with pytest.raises(sa_exc.OperationalError):
        dbretry.with_retry(dead.connect)
    assert time.monotonic() - started < 1.5
    assert dbretry.pool_options() == {"pool_size": 5, "max_overflow": 5}
    assert all(dbretry.backoff_s(n) <= dbretry.MAX_BACKOFF_S for n in range(100))


# ---- a PostgreSQL of the test's own -------------------------------------------------------------
def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(dirs[-1]) if dirs else None


class OwnPostgres:
    """initdb into a temp dir, one postmaster on a free port, max_connections low."""

    def __init__(self, max_connections: int) -> None:
        bindir = _pg_bin()
        if bindir is None:
            pytest.skip("no initdb/pg_ctl on this machine")
        self.bindir, self.port = bindir, free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="batchroute-pg-"))
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-sync")
        self.options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                        f"-c max_connections={max_connections} -c fsync=off")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-o", self.options,
                  "-l", str(self.dir / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    pg = OwnPostgres(max_connections=30)
    pg.start()
    try:
        yield pg
    finally:
        pg.remove()


def _hog(url: str, hold_s: float) -> int:
    """Take every free connection for `hold_s` seconds; how many were taken."""
    import psycopg2

    held = []
    try:
        while True:
            try:
                held.append(psycopg2.connect(url, connect_timeout=3))
            except psycopg2.OperationalError as e:
                assert "too many clients" in str(e) or "remaining connection slots" in str(e), e
                break
        time.sleep(hold_s)
        return len(held)
    finally:
        for conn in held:
            conn.close()


def test_database_full_or_restarted_mid_batch_every_job_ends_within_a_minute(
        own_postgres: OwnPostgres, start_worker: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = own_postgres.url
    monkeypatch.setenv("BATCHROUTE_DATABASE_URL", url)
    cfg = _sim_config(tmp_path / "cfg.toml", latency_ms=150)
    monkeypatch.setenv("BATCHROUTE_CONFIG", str(cfg))
    store = Store(get_engine(url))
    worker = start_worker(concurrency=4, BATCHROUTE_DATABASE_URL=url,
                          BATCHROUTE_CONFIG=str(cfg), BATCHROUTE_DB_RETRY_S="120",
                          BATCHROUTE_CHUNK_SIZE="1")
    res = CliRunner().invoke(main, ["submit", str(make_batch(tmp_path / "b.jsonl", 80)),
                                    "--json"])
    assert res.exit_code == 0, res.output
    batch_id, jobs = json.loads(res.stdout)["batch_id"], json.loads(res.stdout)["jobs"]

    def done() -> int:
        return sum(store.state_counts(batch_id).get(s, 0) for s in FINISHED)

    wait_for(lambda: done() >= 5, 60, f"first jobs; worker log:\n{worker.log()[-3000:]}")
    store.engine.dispose()
    own_postgres.stop()  # every connection dies, the worker gets "connection refused"
    time.sleep(6)
    own_postgres.start()
    hogged = _hog(url, hold_s=4)  # and then "too many clients"
    back = time.monotonic()
    done_at_back = done()
    assert hogged > 0
    wait_for(lambda: done() == jobs, 60,
             f"every job to end within a minute; worker log:\n{worker.log()[-3000:]}")
    took = time.monotonic() - back
    assert done_at_back < jobs  # the outage fell mid-batch
    assert took < 60
    counts = store.state_counts(batch_id)
    assert counts.get("succeeded") == jobs, counts
    assert "db_transient_error" in worker.log()
    store.engine.dispose()


# ---- fork safety and wait -----------------------------------------------------------------------
FORK_APP = '''
"""A Celery app module that builds a Client at module level, before the prefork fork."""
from batchroute import Client

CLIENT = Client.from_env(batch="module-level")
CLIENT.store.get_job("warm-up")  # a pooled connection is open when the pool forks

from workers import app  # noqa: E402,F401
'''


@pytest.mark.integration
def test_client_at_module_level_in_a_prefork_worker(redis_url: str, tmp_path: Path,
                                                    db_url: str) -> None:
    from batchroute import Client

    (tmp_path / "forkapp.py").write_text(FORK_APP)
    cfg = _sim_config(tmp_path / "cfg.toml", latency_ms=5)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}",
           "BATCHROUTE_BROKER_URL": redis_url, "BATCHROUTE_DATABASE_URL": db_url,
           "BATCHROUTE_CONFIG": str(cfg), "BATCHROUTE_LOG_FORMAT": "json"}
    log = tmp_path / "prefork.log"
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "forkapp", "worker",
                             "--pool", "prefork", "-c", "3", "--without-gossip",
                             "--without-mingle", "-l", "WARNING",
                             "-n", f"fork{os.getpid()}@%h"],
                            cwd=tmp_path, env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        os.environ["BATCHROUTE_CONFIG"] = str(cfg)
        try:
            client = Client.from_env(batch="fork-test")
        finally:
            del os.environ["BATCHROUTE_CONFIG"]
        handles = [client.enqueue(messages=[{"role": "user", "content": f"Ticket {i}: yes?"}],
                                  custom_id=f"f-{i}") for i in range(24)]
        for h in handles:
            result = h.wait(timeout=90)
            assert result.content and result.job_id == h.job_id
            assert client.store.get_job(h.job_id).custom_id == h.custom_id  # type: ignore
    finally:
        _stop(proc)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


class _HungStore(Store):
    """A store whose reads hang, as on a dead connection with no socket timeout."""

    def get_job(self, job_id: str) -> Any:
        time.sleep(30)
        return None


def test_wait_timeout_is_a_hard_bound(db_url: str) -> None:
    import asyncio

    from batchroute.client import JobHandle, JobTimeout

    handle = JobHandle(_HungStore(get_engine(db_url)), "job-1", "c-1")
    started = time.monotonic()
    with pytest.raises(JobTimeout):
        handle.wait(timeout=0.5)
    assert time.monotonic() - started < 1.5
    started = time.monotonic()
    with pytest.raises(JobTimeout):
        asyncio.run(handle.wait_async(timeout=0.5))
    assert time.monotonic() - started < 1.5


def test_engines_are_reset_in_a_forked_child(db_url: str) -> None:
    """After os.fork the child gets a fresh pool, not the parent's open connections."""
    engine = get_engine(db_url)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    parent_pool = engine.pool
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report whether the pool was replaced, then leave at once
        os.write(write, b"1" if engine.pool is not parent_pool else b"0")
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)
    engine_url(db_url)  # the parent's engine is untouched
    assert engine.pool is parent_pool
