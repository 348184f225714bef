"""When a job has no model to call right now: wait (without spinning), move up, or fail.

A batch tolerates latency, so a transient outage is a reason to wait, never to fail:
with no equivalent model and no higher tier, a job waits until its batch's deadline
(`--deadline`, 24 h by default, like the provider batch APIs' completion window) and only
then fails. Waiting does not spin: the job's next message is scheduled for when the
breaker lets calls through again (a broker countdown, capped at `MAX_DEFER_S` so a
re-check happens at least that often), so the number of deferrals grows with the
breaker's openings, not with the time spent waiting.

`when_no_model` is the pure decision; `batch_deadline` reads (and briefly caches) the
deadline stored on the batch.
"""

from __future__ import annotations

import random
import re
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

DEFAULT_DEADLINE_S = 24 * 3600.0
# The longest countdown a waiting job's message gets: past it the job re-checks.
MAX_DEFER_S = 300.0
# The shortest: below it a deferral would cost more than it waits.
MIN_DEFER_S = 0.05
# With a higher tier available, a job waits for its own tier this many times or this
# long, then the next tier takes it (the user would rather pay more than wait forever).
MAX_DEFERRALS_BEFORE_ESCALATION = 5
ESCALATE_AFTER_S = 60.0
_CACHE_TTL_S = 30.0

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*([smhd])\s*)+$")


def parse_duration(text: str) -> float:
    """Seconds in '24h', '90m', '1h30m', '45s', '2d' or a bare number of seconds."""
    text = text.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        if not _DURATION.match(text):
            raise ValueError(f"not a duration: {text!r} (use e.g. 24h, 90m, 1h30m)") from None
        seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])",
                                                                   text))
    if seconds <= 0:
        raise ValueError(f"a deadline must be in the future: {text!r}")
    return seconds


@dataclass(frozen=True)
class Wait:
    """What a job with no model to call does: 'defer' (for `delay_s`), 'escalate' or 'fail'."""

    action: str
    delay_s: float = 0.0
    code: str = ""


def when_no_model(now: float, deadline: float, retry_in_s: float, waited: int,
                  waiting_since: float, higher_tier: bool, cooldown_s: float,
                  rng: random.Random | None = None) -> Wait:
    """Decide for a job whose tier has no model letting calls through.

    `retry_in_s` is how long until the soonest breaker of its tier half-opens (0 when one
    is half-open but its trial slots are taken); `waited`/`waiting_since` say how long this
    job has been waiting already.
    """
    if higher_tier and (waited >= MAX_DEFERRALS_BEFORE_ESCALATION
                        or now - waiting_since >= ESCALATE_AFTER_S):
        return Wait("escalate")
    left = deadline - now
    if left <= 0:
        return Wait("fail", code="deadline_exceeded")
    # Half-open with its trial slots taken: the trials decide within about a call's
    # latency, so look again after a fraction of the cooldown.
    base = retry_in_s if retry_in_s > 0 else min(cooldown_s / 2, 5.0)
    jitter = 1.0 + 0.2 * (rng or random).random()  # spread a crowd of waiting jobs
    delay = min(MAX_DEFER_S, max(MIN_DEFER_S, base * jitter))
    if higher_tier:  # do not sleep past the moment the next tier takes over
        delay = min(delay, max(MIN_DEFER_S, waiting_since + ESCALATE_AFTER_S - now))
    return Wait("defer", delay_s=min(delay, left))


def deadline_at(created_at: datetime, deadline_s: float | None) -> datetime:
    return aware(created_at) + timedelta(seconds=deadline_s or DEFAULT_DEADLINE_S)


def aware(t: datetime) -> datetime:
    """A stored time as UTC-aware (SQLite hands datetimes back naive)."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


# store -> batch id -> ((deadline, provider batch flag), when read); weak, so a closed
# store's entries go with it.
_cache: weakref.WeakKeyDictionary[Any, dict[str, tuple[tuple[float, bool | None], float]]] = (
    weakref.WeakKeyDictionary())
_cache_lock = threading.Lock()


def batch_deadline(store: Any, batch_id: str) -> float:
    """The batch's deadline as a Unix time: its `deadline_at`, else created + 24 h.
    Cached per store for `_CACHE_TTL_S` (read on the rare paths where a job must wait)."""
    return _batch_facts(store, batch_id)[0]


def provider_batch_flag(store: Any, batch_id: str) -> bool | None:
    """The batch's `--provider-batch` choice (None: the config decides), cached likewise."""
    return _batch_facts(store, batch_id)[1]


def _batch_facts(store: Any, batch_id: str) -> tuple[float, bool | None]:
    mono = time.monotonic()
    with _cache_lock:
        hit = _cache.get(store, {}).get(batch_id)
    if hit is not None and mono - hit[1] < _CACHE_TTL_S:
        return hit[0]
    batch = store.get_batch(batch_id)
    flag = getattr(batch, "provider_batch", None) if batch is not None else None
    if batch is None:
        value = time.time() + DEFAULT_DEADLINE_S
    elif getattr(batch, "deadline_at", None) is not None:
        value = aware(batch.deadline_at).timestamp()
    else:
        value = deadline_at(batch.created_at, None).timestamp()
    with _cache_lock:
        _cache.setdefault(store, {})[batch_id] = ((value, flag), mono)
    return value, flag
