"""API keys: loaded clean, and never written anywhere in clear.

Why this module exists: some providers echo the key they were sent in a 401/400 body or
header, and httpx quotes a header it refuses (`Illegal header value b'Bearer sk-…\\n'`).
Every such text flows into a ProviderError, from there into Attempt rows, job errors,
the errors file and the logs. So keys are (1) stripped when loaded, since a key with a
trailing newline (a `$(cat key.txt)` or a Kubernetes secret file) is the common cause of
that echo, and (2) redacted from every text that can carry an echo: `redact` is applied
where a ProviderError is built, where error lines are written, and to every log line
(`structlog_processor`, `RedactingFilter` for stdlib logging).

Redacted are: every key this process loaded (`api_key`) and every key-like environment
variable (`*_API_KEY`, `*_TOKEN`, `*_SECRET`, ...), each with its variants (as given,
stripped, repr-, JSON- and URL-escaped), plus common key shapes seen in the wild
(`sk-…`, `sk-ant-…`, `Bearer …`), so a key of a provider we were not told about is caught
too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import quote

REDACTED = "[REDACTED]"

# Shorter values are not keys (and redacting them would shred ordinary text).
MIN_SECRET_LEN = 8
# Environment variables whose values are treated as secrets even before anyone loads them.
_SECRET_ENV = re.compile(r"(API_?KEY|_KEY|TOKEN|SECRET|PASSWORD)$", re.IGNORECASE)

# Key shapes of the main vendors: OpenAI (sk-, sk-proj-), Anthropic (sk-ant-), Groq (gsk_),
# Google (AIza), and any bearer credential. Linear (no nested quantifiers).
_SHAPES = (
    r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_\-]{8,}"
    r"|\bgsk_[A-Za-z0-9]{16,}"
    r"|\bAIza[0-9A-Za-z_\-]{20,}"
    r"|(?<=Bearer )[^\s'\",;]{4,}"
    r"|(?<=bearer )[^\s'\",;]{4,}"
)

_lock = threading.Lock()
_secrets: set[str] = set()
_env_scanned = False
_pattern: re.Pattern[str] = re.compile(_SHAPES)
# Substrings one of which any match contains: a plain `in` test per marker (C speed) spares
# the regex, slow on alternations with lookbehinds, for the text that holds none (~all).
_SHAPE_MARKERS = ("sk-", "gsk_", "AIza", "earer ")
_markers: tuple[str, ...] = _SHAPE_MARKERS


def _variants(value: str) -> set[str]:
    """The forms a key takes once quoted by someone: raw, stripped, repr, JSON, URL."""
    out = set()
    for v in {value, value.strip()}:
        out.update({v, repr(v)[1:-1], json.dumps(v)[1:-1], quote(v, safe="")})
    return {v for v in out if len(v.strip()) >= MIN_SECRET_LEN}


def _rebuild() -> None:
    global _pattern, _markers
    literals = sorted({v for s in _secrets for v in _variants(s)}, key=len, reverse=True)
    alternatives = [re.escape(v) for v in literals] + [_SHAPES]
    _pattern = re.compile("|".join(alternatives))
    # Every variant of a key keeps the key's longest alphanumeric run (quoting and escaping
    # only touch other characters): one marker per key.
    cores = {max(re.findall(r"[A-Za-z0-9]+", v) or [v], key=len) for v in _secrets}
    _markers = _SHAPE_MARKERS + tuple(sorted(cores))


def register(value: str | None) -> None:
    """Treat `value` (and its variants) as a secret from now on."""
    if not value or len(value.strip()) < MIN_SECRET_LEN:
        return
    with _lock:
        if value in _secrets:
            return
        _secrets.add(value)
        _rebuild()


def _scan_env() -> None:
    global _env_scanned
    if _env_scanned:
        return
    _env_scanned = True
    for name, value in list(os.environ.items()):
        if _SECRET_ENV.search(name) and not name.startswith("BATCHROUTE_"):
            register(value)


def api_key(env_name: str | None) -> str | None:
    """The key in environment variable `env_name`, stripped of surrounding whitespace and
    newlines (a trailing newline made httpx reject the header and echo the key); None when
    unset or blank. The key is registered for redaction."""
    if not env_name:
        return None
    raw = os.environ.get(env_name)
    if raw is None:
        return None
    register(raw)
    key = raw.strip()
    return key or None


def redact(text: str) -> str:
    """`text` with every known secret and key-shaped token replaced by [REDACTED]."""
    if not text:
        return text
    if not _env_scanned:
        _scan_env()
    for marker in _markers:
        if marker in text:
            break
    else:
        return text
    return _pattern.sub(REDACTED, text)


def redact_obj(value: Any, _depth: int = 0) -> Any:
    """`redact` applied to every string inside a JSON-like value (dicts, lists)."""
    if isinstance(value, str):
        return redact(value)
    if _depth > 50:
        return value
    if isinstance(value, dict):
        return {k: redact_obj(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_obj(v, _depth + 1) for v in value]
    return value


def structlog_processor(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]
                        ) -> MutableMapping[str, Any]:
    """A structlog processor: every string value of every log line redacted. Placed after
    format_exc_info so tracebacks are covered too."""
    for key, value in event_dict.items():
        if isinstance(value, str | dict | list | tuple):
            event_dict[key] = redact_obj(value)
        elif isinstance(value, BaseException):
            event_dict[key] = redact(repr(value))
    return event_dict


class RedactingFilter(logging.Filter):
    """For stdlib logging (Celery's own log lines, tracebacks of failed tasks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed format string: leave it to the handler
            return True
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = redact(message), None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_logging_filter(logger: logging.Logger | None = None) -> None:
    """Add RedactingFilter to every handler of `logger` (default: the root logger)."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
