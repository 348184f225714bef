"""How long a provider asks us to wait, from every header form seen in the wild.

Pure (no I/O): headers in, seconds out. Providers and gateways disagree on how to say
"come back later", and a wait we fail to read becomes either a hammering retry (another
429, maybe a ban) or a guess. The forms, in the order they are trusted:

1. ``retry-after-ms`` (OpenAI, Azure): milliseconds, the most precise.
2. ``retry-after`` (RFC 9110): delay-seconds (some send floats) or an HTTP-date.
3. The same two with LiteLLM's proxy prefix, ``llm_provider-retry-after(-ms)``: the proxy
   forwards its upstream's raw headers under ``llm_provider-``.
4. Reset headers of the limit that was hit: OpenAI's ``x-ratelimit-reset-requests`` /
   ``-tokens`` (Go-style durations, ``1m30s``, ``6ms``, ``0.5s``), Anthropic's
   ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-reset`` (RFC 3339
   timestamps), also under the ``llm_provider-`` prefix. When a ``-remaining`` header says
   which limit is at 0, that limit's reset is used; otherwise the longest.
5. ``x-ratelimit-reset`` (OpenRouter, GitHub-style): an epoch in seconds or milliseconds,
   or seconds from now when the number is small.

Garbage, negative, infinite and NaN values are ignored (the next form is tried), a date in
the past means "now" (0 s), and the answer is capped at ``MAX_RETRY_AFTER_S`` and by the
caller's ``cap_s`` (the job's remaining deadline: waiting longer than that helps nobody).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

MAX_RETRY_AFTER_S = 3600.0
PREFIXES = ("", "llm_provider-")
# (remaining header, reset header, how the reset is written)
_RESET_PAIRS = (
    ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests", "duration"),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens", "duration"),
    ("anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-requests-reset", "instant"),
    ("anthropic-ratelimit-tokens-remaining", "anthropic-ratelimit-tokens-reset", "instant"),
    ("anthropic-ratelimit-input-tokens-remaining", "anthropic-ratelimit-input-tokens-reset",
     "instant"),
    ("anthropic-ratelimit-output-tokens-remaining", "anthropic-ratelimit-output-tokens-reset",
     "instant"),
)
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
# Epochs after 2001-09-09 in seconds, or in milliseconds; smaller numbers are deltas.
_EPOCH_S = 1e9
_EPOCH_MS = 1e12


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) and value >= 0 else None


def _number(text: str) -> float | None:
    try:
        return _finite(float(text.strip()))
    except (ValueError, AttributeError):
        return None


def parse_duration(text: str) -> float | None:
    """Seconds in a Go-style duration (OpenAI's reset headers: '1s', '6m0s', '20ms',
    '1h2m3.5s'), or a bare number of seconds; None when unreadable."""
    text = (text or "").strip()
    if not text:
        return None
    bare = _number(text)
    if bare is not None:
        return bare
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        return None
    return _finite(total)


def _seconds_until(when: datetime, now: float) -> float:
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def _http_date(text: str, now: float) -> float | None:
    try:
        return _seconds_until(parsedate_to_datetime(text.strip()), now)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _instant(text: str, now: float) -> float | None:
    """An RFC 3339 timestamp (Anthropic's reset headers) as seconds from now."""
    try:
        return _seconds_until(datetime.fromisoformat(text.strip()), now)
    except (TypeError, ValueError, OverflowError):
        return None


def _retry_after(text: str, now: float) -> float | None:
    seconds = _number(text)
    return seconds if seconds is not None else _http_date(text, now)


def _epoch_or_delta(text: str, now: float) -> float | None:
    value = _number(text)
    if value is None:
        return parse_duration(text)
    if value >= _EPOCH_MS:
        return max(0.0, value / 1000 - now)
    if value >= _EPOCH_S:
        return max(0.0, value - now)
    return value


def _from_resets(h: Mapping[str, str], prefix: str, now: float) -> float | None:
    exhausted: list[float] = []
    known: list[float] = []
    for remaining_name, reset_name, form in _RESET_PAIRS:
        raw = h.get(prefix + reset_name)
        if raw is None:
            continue
        reset = parse_duration(raw) if form == "duration" else _instant(raw, now)
        if reset is None:
            continue
        known.append(reset)
        if _number(h.get(prefix + remaining_name, "")) == 0:
            exhausted.append(reset)
    chosen = exhausted or known
    return max(chosen) if chosen else None


def _uncapped(h: Mapping[str, str], now: float) -> float | None:
    for prefix in PREFIXES:
        ms = _number(h.get(prefix + "retry-after-ms", ""))
        if ms is not None:
            return ms / 1000
        raw = h.get(prefix + "retry-after")
        if raw is not None and (seconds := _retry_after(raw, now)) is not None:
            return seconds
    for prefix in PREFIXES:
        if (seconds := _from_resets(h, prefix, now)) is not None:
            return seconds
    for prefix in PREFIXES:
        raw = h.get(prefix + "x-ratelimit-reset")
        if raw is not None and (seconds := _epoch_or_delta(raw, now)) is not None:
            return seconds
    return None


def retry_after_seconds(headers: Mapping[str, str], cap_s: float | None = None,
                        now: float | None = None) -> float | None:
    """Seconds the provider asks us to wait, or None when no header says so.

    ``headers`` may be any mapping (``httpx.Headers`` included); names are compared
    case-insensitively. ``cap_s`` (e.g. the job's remaining deadline) and
    ``MAX_RETRY_AFTER_S`` bound the answer; ``now`` (epoch seconds) is for tests.
    """
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    return capped(_uncapped(lowered, time.time() if now is None else now), cap_s)


def capped(seconds: float | None, cap_s: float | None = None) -> float | None:
    """A wait bounded by ``MAX_RETRY_AFTER_S`` and by ``cap_s`` (e.g. what is left of the
    batch's deadline, for a caller that holds the error's ``retry_after`` and the deadline);
    garbage (negative, NaN, infinite) becomes None, a cap already passed becomes 0."""
    if seconds is None or math.isnan(seconds) or seconds < 0:
        return None
    limit = MAX_RETRY_AFTER_S
    if cap_s is not None and not math.isnan(cap_s):
        limit = min(limit, max(0.0, cap_s))
    return min(seconds, limit)


_IN_MESSAGE = re.compile(
    r"(?:try again|retry after|retry in|wait)\s+(?:in\s+)?(\d+(?:\.\d+)?)\s*"
    r"(ms|milliseconds?|s\b|secs?\b|seconds?)", re.IGNORECASE)


def retry_after_in_message(message: str, cap_s: float | None = None) -> float | None:
    """The wait some providers only write in prose ("Please try again in 6ms.", Azure's
    "Please retry after 6 seconds."): a fallback for when no header carries it."""
    match = _IN_MESSAGE.search(message or "")
    if match is None:
        return None
    value = float(match.group(1)) * (0.001 if match.group(2).lower().startswith("m") else 1.0)
    return retry_after_seconds({"retry-after": repr(value)}, cap_s=cap_s, now=0.0)


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """The historical name (``providers.base.parse_retry_after``): no deadline cap."""
    return retry_after_seconds(headers)
