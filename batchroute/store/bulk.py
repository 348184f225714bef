"""Bulk loading of Job rows for ingestion: PostgreSQL COPY, or a multi-row INSERT elsewhere.

Part of the store layer (the only other module that writes SQL besides `store`): it
exists because a 100k-line batch must be stored at thousands of rows a second, and the
ORM's executemany spends ~270 µs per row here, mostly in Python (bind processing and
parameter interpolation), on the one process that also has to read and publish the file.

On PostgreSQL a chunk is COPYed as text into a session-local staging table and moved into
`job` with one ``INSERT .. SELECT .. ON CONFLICT DO NOTHING RETURNING id``, all in one
transaction: the conflict rule is what makes resubmitting a file add nothing, and RETURNING
says which rows were new, so only those are published. The text lines are made by
`encode_job`, a pure function, so the ingestion's parser processes can make them in
parallel. Elsewhere (SQLite) the same INSERT .. ON CONFLICT DO NOTHING RETURNING is sent as
one multi-row statement per chunk.

Values go in as the ORM would store them: JSON columns as `json.dumps` text (None becomes
JSON null, as SQLAlchemy's JSON type does), timestamps as ISO 8601 with their UTC offset
cast through ``timestamptz``, and a column missing from the row gets its declared default.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Engine

from batchroute.store.tables import Job

_TABLE: Any = Job.__table__  # type: ignore[attr-defined]
_COLUMNS: list[Any] = list(_TABLE.columns)
_KINDS: list[tuple[str, str, Any]] = [
    (c.name, "json" if isinstance(c.type, JSON) else
     "time" if isinstance(c.type, DateTime) else "plain", c.default) for c in _COLUMNS]
STAGING = "batchroute_job_in"
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def supports_copy(engine: Engine) -> bool:
    """COPY is used on PostgreSQL with psycopg2 or psycopg 3."""
    return engine.dialect.name == "postgresql" and engine.dialect.driver in ("psycopg2",
                                                                             "psycopg")


def _default(default: Any) -> Any:
    if default is None:
        return None
    return default.arg(None) if default.is_callable else default.arg


def _json(value: Any) -> str:
    # json.dumps escapes every control character, so only backslashes need doubling.
    if isinstance(value, _Raw):
        return value
    if value is None:
        return "null"
    if value == [] and isinstance(value, list):
        return "[]"
    return json.dumps(value).replace("\\", "\\\\")


def _time(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _plain(value: Any) -> str:
    if isinstance(value, str):
        return value.translate(_COPY_ESCAPES)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# Columns the adaptive cascade may still change after parsing (batchroute.adaptive); they
# go last in the COPY so that the rest of a row can be encoded before it.
LATE = ("tier_index", "tier", "model", "provider", "options", "ladder")
_ENCODERS = sorted(
    [(name, _json if kind == "json" else _time if kind == "time" else _plain,
      kind == "json", default) for name, kind, default in _KINDS],
    key=lambda e: e[0] in LATE)
_EARLY = [e for e in _ENCODERS if e[0] not in LATE]
_LATE_ENCODERS = [e for e in _ENCODERS if e[0] in LATE]


def _encode(row: dict[str, Any], encoders: list[tuple[str, Any, bool, Any]]) -> str:
    out: list[str] = []
    for name, encoder, is_json, default in encoders:
        value = row[name] if name in row else _default(default)
        out.append("\\N" if value is None and not is_json else encoder(value))
    return "\t".join(out)


def encode_job(row: dict[str, Any]) -> str:
    """One Job row as a line of PostgreSQL COPY text format (no trailing newline)."""
    return _encode(row, _ENCODERS)


# Parts of `options` the cascade never reads nor changes, and the bulkiest (a json_schema
# validator carries a whole schema): kept as JSON text from the parser process on.
_FIXED_OPTIONS = ("validators", "metadata")

PreEncoded = tuple[str, dict[str, Any], str]


def pre_encode(row: dict[str, Any]) -> PreEncoded:
    """Encode a row except what the ingesting process may still change (the adaptive
    cascade moves a row's start tier): a parser process does the expensive part. Returns
    (the encoded columns, a dict of the `LATE` columns plus `id` and `task` with `options`
    holding only its small keys, the JSON of the other options keys); `finish_encode`
    makes the line. Plain str and small dicts, because bulky nested dicts cost more to
    pass between processes (pickling) than to encode."""
    late = {name: row[name] for name in LATE if name in row}
    late["id"], late["task"] = row["id"], row["task"]
    options = dict(late.get("options") or {})
    fixed = {k: options.pop(k) for k in _FIXED_OPTIONS if k in options}
    late["options"] = options
    return _encode(row, _EARLY), late, json.dumps(fixed)


def finish_encode(pre: PreEncoded) -> str:
    """The COPY line of a `pre_encode`d row, with its late columns as they are now."""
    early, late, fixed = pre
    small = json.dumps(late["options"])
    if fixed == "{}" or small == "{}":
        merged = fixed if small == "{}" else small
    else:  # two JSON objects with disjoint keys, joined as text
        merged = fixed[:-1] + ", " + small[1:]
    row = dict(late, options=_Raw(merged.replace("\\", "\\\\")))
    return early + "\t" + _encode(row, _LATE_ENCODERS)


class _Raw(str):
    """Already-encoded JSON column text (never leaves this process)."""


def _pg_type(column: Any) -> str:
    from sqlalchemy.dialects import postgresql

    if isinstance(column.type, DateTime):
        return "timestamptz"
    return str(column.type.compile(dialect=postgresql.dialect()))


_COPY_COLUMNS = sorted(_COLUMNS, key=lambda c: c.name in LATE)  # the order _ENCODERS uses
_NAMES = ", ".join(f'"{c.name}"' for c in _COPY_COLUMNS)
_CREATE_STAGING = (f"CREATE TEMP TABLE IF NOT EXISTS {STAGING} ("
                   + ", ".join(f'"{c.name}" text' for c in _COPY_COLUMNS)
                   + ") ON COMMIT DELETE ROWS")
_COPY = f"COPY {STAGING} ({_NAMES}) FROM STDIN"


@functools.lru_cache(maxsize=1)
def _move() -> str:
    """The staging table's rows into `job`, cast to its PostgreSQL types (built on first
    COPY: compiling them imports the PostgreSQL dialect, ~50 ms a SQLite process skips)."""
    return (f"INSERT INTO job ({_NAMES}) SELECT "
            + ", ".join(f'CAST("{c.name}" AS {_pg_type(c)})' for c in _COPY_COLUMNS)
            + f" FROM {STAGING} ON CONFLICT DO NOTHING RETURNING id")


def copy_jobs(engine: Engine, lines: Sequence[str]) -> set[str]:
    """COPY encoded rows into `job` in one transaction; returns the ids that were new."""
    if not lines:
        return set()
    data = "\n".join(lines) + "\n"
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute(_CREATE_STAGING)
        if engine.dialect.driver == "psycopg2":
            import io

            cur.copy_expert(_COPY, io.StringIO(data))
        else:  # psycopg 3
            with cur.copy(_COPY) as copy:
                copy.write(data)
        cur.execute(_move())
        ids = {r[0] for r in cur.fetchall()}
        raw.commit()
        return ids
    except BaseException:
        raw.rollback()
        raise
    finally:
        raw.close()  # back to the pool


def insert_jobs(engine: Engine, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Multi-row INSERT .. ON CONFLICT DO NOTHING RETURNING id; returns the ids that were new."""
    if not rows:
        return set()
    dialect = engine.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        stmt: Any = postgresql.insert(_TABLE)
    elif dialect == "sqlite":
        from sqlalchemy.dialects import sqlite

        stmt = sqlite.insert(_TABLE)
    else:  # pragma: no cover - other databases are not supported yet
        raise RuntimeError(f"unsupported database dialect {dialect!r}")
    stmt = stmt.on_conflict_do_nothing().returning(_TABLE.c.id)
    with engine.begin() as conn:
        return {r[0] for r in conn.execute(stmt, list(rows))}


class JobLoader:
    """Stores chunks of Job rows the fastest way the store's database allows.

    `encoded` tells whether `insert` takes `encode_job` lines (COPY) or row dicts."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.encoded = supports_copy(engine)

    def insert(self, payloads: Sequence[Any]) -> set[str]:
        """Store a chunk in one transaction; returns the ids of the rows that were new."""
        if self.encoded:
            return copy_jobs(self.engine, payloads)
        return insert_jobs(self.engine, payloads)
