"""What to do after an attempt: succeed, retry, fail over, escalate or fail.

Pure decision logic, apart from I/O: given where the job stands on its ladder
and what the attempt produced, return one Decision. Every path is bounded so
no job retries forever: a per-model retry limit, a per-job attempt limit, and
a ladder that ends.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from enum import StrEnum

from batchroute.providers.base import ErrorKind

MAX_ATTEMPTS_PER_JOB = 12
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
# Retries past max_retries while a job waits out transient errors (Position.can_wait)
# stay at the first backoff step (0.25-0.5 s), however many errors came before: the
# model's breaker is closed, so it answers most calls and each retry is an independent
# draw; a longer wait only stretched the batch's tail (benchmarks/peers.py, 30% faults:
# the last ~2 s of a 6 s run were jobs sleeping 1-2 s before their 4th and 5th attempts).
# It costs the provider nothing extra: a waiting job frees its worker slot, so the call
# rate stays bounded by concurrency; a 429's Retry-After still wins.
WAIT_BACKOFF_STEPS = 1
# While every model of a tier is cooling down (circuit breakers open), a job waits: see
# batchroute.waiting (until the batch deadline, or until the next tier takes it).
# The longest single wait a provider's Retry-After can impose: `Retry-After: 999999999`
# made a job wait 31 years. Past this, the retry (and later failover) comes sooner.
MAX_RETRY_WAIT_S = 300.0


class Action(StrEnum):
    SUCCEED = "succeed"
    RETRY = "retry"  # same model, after a delay
    FAILOVER = "failover"  # same tier, another model/provider
    ESCALATE = "escalate"  # next tier up
    FAIL = "fail"


# How each provider error class is handled first. Transient classes retry the same
# model; errors that another model may not have (filters, context) move on at once;
# errors that no other model will fix (bad request, bad key) end the job.
TRANSIENT = {ErrorKind.RATE_LIMITED, ErrorKind.OVERLOADED, ErrorKind.TIMEOUT,
             ErrorKind.CONNECTION, ErrorKind.BAD_RESPONSE, ErrorKind.MALFORMED_REPLY,
             ErrorKind.REPLY_TOO_LARGE, ErrorKind.DEADLINE_EXCEEDED}
MOVE_ON = {ErrorKind.CONTENT_FILTER, ErrorKind.CONTEXT_LENGTH}
FATAL = {ErrorKind.INVALID_REQUEST, ErrorKind.AUTH}


@dataclass(frozen=True)
class Position:
    """Where a job stands: enough to decide, nothing to fetch."""

    tier_index: int
    ladder_len: int
    attempt_no: int
    consecutive_errors: int  # trailing provider errors on the current model, this one included
    has_failover: bool  # another model of this tier is available
    max_retries: int = 2
    # No equivalent model, no higher tier and the batch deadline not reached: transient
    # errors are waited out (retried with backoff) instead of failing the job.
    can_wait: bool = False


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""
    delay_s: float = 0.0
    error_code: str | None = None
    exclude_current: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def backoff(n: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff; the provider's Retry-After wins when it is longer."""
    r = (rng or random).random()
    delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * (2 ** max(0, min(n, 32) - 1))) * (0.5 + r / 2)
    return max(delay, safe_wait(retry_after))


def safe_wait(seconds: object, cap: float | None = None) -> float:
    """Any wait a provider asked for, made usable: a finite number in [0, cap]. inf, nan,
    negative, huge or not a number at all (the header parser's output is outside data)
    never reach a timer, which would overflow or die on them."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return 0.0
    value = float(seconds)
    if math.isnan(value) or value <= 0.0:
        return 0.0
    return min(value, MAX_RETRY_WAIT_S if cap is None else cap)


def _move_up(pos: Position, reason: str, code: str) -> Decision:
    if pos.tier_index + 1 < pos.ladder_len:
        return Decision(Action.ESCALATE, reason)
    return Decision(Action.FAIL, f"{reason} (top tier of the ladder reached)", error_code=code)


def after_validation(pos: Position, ok: bool, reason: str) -> Decision:
    if ok:
        return Decision(Action.SUCCEED)
    if pos.attempt_no >= MAX_ATTEMPTS_PER_JOB:
        return Decision(Action.FAIL, f"{reason} (attempt limit reached)",
                        error_code="attempts_exhausted")
    return _move_up(pos, reason, "validation_failed")


def after_error(pos: Position, kind: ErrorKind, message: str,
                retry_after: float | None = None) -> Decision:
    reason = f"{kind.value}: {message}"
    if kind in FATAL:
        return Decision(Action.FAIL, reason, error_code=kind.value)
    if pos.attempt_no >= MAX_ATTEMPTS_PER_JOB:
        return Decision(Action.FAIL, f"{reason} (attempt limit reached)",
                        error_code="attempts_exhausted")
    if kind in TRANSIENT and pos.consecutive_errors <= pos.max_retries:
        return Decision(Action.RETRY, reason, delay_s=backoff(pos.consecutive_errors, retry_after))
    if kind in TRANSIENT and pos.can_wait:
        # Waiting out transient errors on a model that answers most calls (else its breaker
        # would be open): failures are then independent draws, and a longer backoff only
        # stretches the batch's tail. Overload is the breaker's and the pools' business.
        return Decision(Action.RETRY, reason,
                        delay_s=backoff(min(pos.consecutive_errors, WAIT_BACKOFF_STEPS),
                                        retry_after))
    if pos.has_failover:
        return Decision(Action.FAILOVER, reason, exclude_current=True)
    return _move_up(pos, reason, kind.value if kind in MOVE_ON else "provider_error")
