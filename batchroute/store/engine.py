"""Connections: one engine per database URL and process, SQLite's pragmas, PostgreSQL's
autocommit twin, idle-connection pings, and the schema (created, and columns added to an
older database)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    event,
    exc,
    inspect,
    text,
)
from sqlmodel import SQLModel, create_engine

# The tables must be defined before `create_all` runs (get_engine creates them).
import batchroute.store.tables  # noqa: F401

DEFAULT_DATABASE_URL = "sqlite:///batchroute.db"


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def database_url() -> str:
    return os.environ.get("BATCHROUTE_DATABASE_URL") or DEFAULT_DATABASE_URL


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers (status, client waits) run beside the writing workers;
    # busy_timeout makes concurrent writers queue instead of failing.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


# A pooled connection idle longer than this is pinged before use (see _ping_if_idle).
PING_AFTER_IDLE_S = 10.0


def _mark_idle(_dbapi_conn: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
    """SQLAlchemy's pool_pre_ping costs a round trip on *every* checkout, i.e. two per
    attempt on a busy worker; a connection used a moment ago is alive, so only one that
    sat idle (where a server restart or a firewall's timeout can have killed it) is
    pinged. A dead one is replaced: raising DisconnectionError makes the pool retry with
    a fresh connection (SQLAlchemy's documented pessimistic-disconnect recipe)."""
    idle_since = record.info.get("idle_since")
    if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
        return
    try:
        cur = dbapi_conn.cursor()
        cur.execute("SELECT 1")
        cur.close()
    except Exception as e:
        raise exc.DisconnectionError(f"pooled connection is dead: {e}") from e


def engine_url(url: str) -> str:
    """The SQLAlchemy URL for a database URL. `postgres://` (what many hosts hand out) and a
    bare `postgresql://` (whose default driver is psycopg 3 since SQLAlchemy 2.1) get the
    driver that is installed: psycopg 3 if present, else psycopg2 (the `postgres` extra)."""
    import importlib.util

    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            driver = "psycopg" if importlib.util.find_spec("psycopg") else "psycopg2"
            return f"postgresql+{driver}://{url[len(prefix):]}"
    return url


def _server_engine(url: Any, **options: Any) -> Engine:
    """An engine for a database server: a pool sized for a worker's threads, whose
    connections are pinged only after sitting idle."""
    from batchroute.dbretry import pool_options  # small pools: see there (#15)

    engine = create_engine(url, **pool_options(), **options)
    event.listen(engine, "checkin", _mark_idle)
    event.listen(engine, "checkout", _ping_if_idle)
    return engine


def autocommit_engine(engine: Engine) -> Engine:
    """A PostgreSQL engine whose connections stay in autocommit, for the hot path's single
    statements. Its own pool rather than ``execution_options(isolation_level=...)`` on the
    shared one: switching a pooled connection to autocommit and back on every checkout
    cost ~40 µs of CPU, a fifth of a whole statement. A chunk's transitions go as one
    executemany: with psycopg2 "values_plus_batch" sends them as pages of statements, one
    round trip per page instead of one per job (each statement is atomic on its own)."""
    key = engine.url.render_as_string(hide_password=False) + "#autocommit"
    with _engines_lock:
        auto = _engines.get(key)
        if auto is None:
            batch = ({"executemany_mode": "values_plus_batch"}
                     if engine.dialect.driver == "psycopg2" else {})
            auto = _server_engine(engine.url, isolation_level="AUTOCOMMIT", **batch)
            _engines[key] = auto
        return auto


# Any constant works; it only has to be the same in every process that creates the schema.
_SCHEMA_LOCK_KEY = 0x62617463  # "batc"


def get_engine(url: str | None = None) -> Engine:
    """One engine per URL per process, tables created on first use."""
    url = url or database_url()
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            if url.startswith("sqlite"):
                engine = create_engine(url, connect_args={"check_same_thread": False,
                                                          "timeout": 30})
                event.listen(engine, "connect", _sqlite_pragmas)
            else:
                engine = _server_engine(engine_url(url))
            _create_schema(engine)
            _engines[url] = engine
        return engine


def _create_schema(engine: Engine) -> None:
    """Create missing tables and columns in one transaction. On PostgreSQL the first start of
    a deployment runs this in many processes at once (every worker, beat, the submitter) and
    concurrent CREATE TABLEs fail on the catalog's unique index: an advisory lock makes
    them take turns, and the later ones find the tables there."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
        SQLModel.metadata.create_all(conn)
        _add_missing_columns(conn)


def _add_missing_columns(conn: Connection) -> None:
    """create_all() never alters an existing table: add columns that newer versions declare
    (all nullable) so a database written by an older batchroute keeps working."""
    insp = inspect(conn)
    for table in SQLModel.metadata.sorted_tables:
        if not insp.has_table(table.name):
            continue
        have = {c["name"] for c in insp.get_columns(table.name)}
        for column in table.columns:
            if column.name in have or not column.nullable:
                continue
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(text(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}'))
        # Nor does it create the indexes of a table that exists (e.g. ix_job_reuse).
        indexes = {i["name"] for i in insp.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(conn)


