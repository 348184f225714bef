"""One-line errors for the command line: what went wrong and what to do about it.

A newcomer who points BATCHROUTE_DATABASE_URL at a server that is not running, forgets
the PostgreSQL driver, or has Redis down used to get a 140-line traceback from SQLAlchemy
or kombu. Configuration and connection problems are not bugs: they get one line naming
the thing to check. The traceback is still there for whoever needs it, with
``batchroute --debug`` or ``BATCHROUTE_DEBUG=1``.

``explain`` is pure (exception -> message or None), so every case is testable without
breaking anything; ``FriendlyGroup`` applies it to every command of the CLI.
"""

from __future__ import annotations

import os
import re
import tomllib
from typing import Any

import click

DEBUG_ENV = "BATCHROUTE_DEBUG"
POSTGRES_EXTRA = "pip install 'batchroute[postgres]'"


def debug_enabled(ctx: click.Context | None = None) -> bool:
    """--debug on the command line, or BATCHROUTE_DEBUG set to something true."""
    root = ctx.find_root() if ctx is not None else None
    if root is not None and isinstance(root.params, dict) and root.params.get("debug"):
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _redact(url: str) -> str:
    """The URL without its password, fit to print."""
    return re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", url)


def _first_line(text: str) -> str:
    """The useful line of a driver's message (drivers append hints and background links)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("(Background on this error")]
    line = lines[0] if lines else str(text)
    line = re.sub(r"^\((?:[\w.]+)\)\s*", "", line)  # "(psycopg.OperationalError) ..."
    fatal = re.search(r"FATAL:\s*(.+)", " ".join(lines))
    return fatal.group(1).strip() if fatal else line


def _database_url() -> str:
    from batchroute.store import database_url

    return _redact(database_url())


def _broker_url() -> str:
    from batchroute.broker import broker_url

    return _redact(broker_url())


def _missing_module(e: BaseException) -> str | None:
    name = getattr(e, "name", None) or ""
    if name.split(".")[0] in ("psycopg2", "psycopg"):
        return (f"the PostgreSQL driver is not installed (needed for "
                f"BATCHROUTE_DATABASE_URL={_database_url()}): {POSTGRES_EXTRA}")
    if name.split(".")[0] in ("MySQLdb", "pymysql", "mysqlclient", "cx_Oracle", "pyodbc"):
        return (f"BATCHROUTE_DATABASE_URL={_database_url()} needs the {name} driver; batchroute "
                "is tested on SQLite (sqlite:///batchroute.db) and PostgreSQL "
                f"({POSTGRES_EXTRA})")
    if name.split(".")[0] == "flower":
        return "Flower is not installed: pip install 'batchroute[flower]'"
    return None


def explain(e: BaseException) -> str | None:
    """The one-line message for a configuration or connection problem; None for anything
    else (a bug: the traceback is the useful output then)."""
    if isinstance(e, ModuleNotFoundError):
        return _missing_module(e)
    if isinstance(e, tomllib.TOMLDecodeError):
        return f"the config file is not valid TOML ({e}); fix it or pass another --config"
    if isinstance(e, FileNotFoundError):
        return (f"no such file: {e.filename or e}; check the path (relative paths are from "
                f"{os.getcwd()})")
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename or e}"
    try:
        from sqlalchemy import exc as sa_exc
    except ImportError:  # pragma: no cover - sqlalchemy is a dependency
        sa_exc = None  # type: ignore[assignment]
    if sa_exc is not None:
        if isinstance(e, sa_exc.NoSuchModuleError):
            return (f"BATCHROUTE_DATABASE_URL={_database_url()} names a database driver that "
                    f"is not installed ({e}); for PostgreSQL: {POSTGRES_EXTRA}")
        if isinstance(e, sa_exc.ArgumentError) and "URL" in str(e):
            return (f"BATCHROUTE_DATABASE_URL={_database_url()!r} is not a database URL; "
                    "use sqlite:///batchroute.db or postgresql://user:pass@host/db")
        if isinstance(e, sa_exc.OperationalError | sa_exc.InterfaceError):
            return (f"cannot open the database {_database_url()}: {_first_line(str(e))}; "
                    "check BATCHROUTE_DATABASE_URL (is the server running, does the database "
                    "or the file's directory exist?)")
    broker = _broker_error(e)
    if broker is not None:
        return broker
    return None


def _broker_error(e: BaseException) -> str | None:
    types: list[type[BaseException]] = []
    try:
        from kombu.exceptions import OperationalError as KombuOperationalError

        types.append(KombuOperationalError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        types += [RedisConnectionError, RedisTimeoutError]
    except ImportError:  # pragma: no cover
        pass
    if types and isinstance(e, tuple(types)):
        return (f"cannot reach the broker at {_broker_url()}: {_first_line(str(e))}; is "
                "Redis running? Set BATCHROUTE_BROKER_URL to where it is")
    if isinstance(e, ConnectionRefusedError):
        return f"connection refused: {e}; is the server running?"
    return None


class FriendlyGroup(click.Group):
    """A click group whose commands fail with one line for known problems.

    Exceptions ``explain`` does not know propagate unchanged (with their traceback), and
    so does every exception under --debug / BATCHROUTE_DEBUG=1.

    ``LAZY`` commands are imported when run or listed (click's lazy-loading recipe): the
    `metrics` command needs prometheus_client, ~25 ms that every other command (a
    `submit` first of all) would pay at start-up for nothing.
    """

    LAZY = {"metrics": "batchroute.metrics:metrics"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.LAZY))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.LAZY and cmd_name not in self.commands:
            import importlib

            module, _, name = self.LAZY[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), name)
            assert isinstance(command, click.Command)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as e:
            message = None if debug_enabled(ctx) else explain(e)
            if message is None:
                raise
            raise click.ClickException(
                message + f" (details: batchroute --debug ..., or {DEBUG_ENV}=1)") from None
