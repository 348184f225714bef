"""structlog setup: one pipeline of processors, JSON in production, readable in a terminal.

BATCHROUTE_LOG_FORMAT=json|console picks the renderer (default: console on a
TTY, JSON otherwise); BATCHROUTE_LOG_LEVEL sets the level (default INFO; the
CLI lowers the noise to WARNING so progress bars stay readable).
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

from batchroute import secrets, terminal


def configure_logging(level: str | None = None, fmt: str | None = None) -> None:
    level_name = (level or os.environ.get("BATCHROUTE_LOG_LEVEL") or "INFO").upper()
    fmt = fmt or os.environ.get("BATCHROUTE_LOG_FORMAT") or (
        "console" if sys.stderr.isatty() else "json")
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            secrets.structlog_processor,  # no API key in any log line (providers echo them)
            *([] if fmt == "json" else [terminal.console_processor]),  # no raw ANSI
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    secrets.install_logging_filter()  # stdlib log lines too (Celery's, libraries')
