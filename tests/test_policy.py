from __future__ import annotations

from typing import Any

from batchroute.policy import (
    BACKOFF_BASE_S,
    MAX_ATTEMPTS_PER_JOB,
    Action,
    Position,
    after_error,
    after_validation,
)
from batchroute.providers.base import ErrorKind


def pos(**kw: object) -> Position:
    base: dict[str, Any] = {"tier_index": 0, "ladder_len": 3, "attempt_no": 1,
                            "consecutive_errors": 1, "has_failover": False, "max_retries": 2}
    base.update(kw)
    return Position(**base)


def test_validation_pass_and_escalation() -> None:
    assert after_validation(pos(), True, "").action is Action.SUCCEED
    assert after_validation(pos(), False, "choices: 'maybe'").action is Action.ESCALATE
    top = after_validation(pos(tier_index=2), False, "choices: 'maybe'")
    assert top.action is Action.FAIL
    assert top.error_code == "validation_failed"


def test_transient_errors_retry_then_fail_over_then_escalate() -> None:
    d = after_error(pos(consecutive_errors=1), ErrorKind.RATE_LIMITED, "slow down", retry_after=7)
    assert d.action is Action.RETRY
    assert d.delay_s >= 7  # Retry-After is honoured
    assert after_error(pos(consecutive_errors=3, has_failover=True), ErrorKind.OVERLOADED,
                       "503").action is Action.FAILOVER
    assert after_error(pos(consecutive_errors=3), ErrorKind.TIMEOUT, "t").action is Action.ESCALATE
    assert after_error(pos(consecutive_errors=3, tier_index=2), ErrorKind.TIMEOUT,
                       "t").error_code == "provider_error"


def test_fatal_errors_end_the_job_at_once() -> None:
    for kind in (ErrorKind.AUTH, ErrorKind.INVALID_REQUEST):
        d = after_error(pos(has_failover=True), kind, "bad")
        assert d.action is Action.FAIL
        assert d.error_code == kind.value


def test_context_and_filter_move_on_without_retrying() -> None:
    assert after_error(pos(), ErrorKind.CONTEXT_LENGTH, "too long").action is Action.ESCALATE
    assert after_error(pos(has_failover=True), ErrorKind.CONTENT_FILTER,
                       "no").action is Action.FAILOVER


def test_attempts_are_bounded() -> None:
    d = after_error(pos(attempt_no=MAX_ATTEMPTS_PER_JOB), ErrorKind.OVERLOADED, "x")
    assert d.action is Action.FAIL
    assert d.error_code == "attempts_exhausted"


def test_with_nowhere_else_to_go_transient_errors_are_waited_out_with_a_short_backoff() -> None:
    last = pos(tier_index=2, consecutive_errors=7, attempt_no=8, can_wait=True)
    d = after_error(last, ErrorKind.OVERLOADED, "503")
    # not 30 s, nor a doubling per error: the model answers, each retry is a fresh draw
    assert d.action is Action.RETRY and d.delay_s <= BACKOFF_BASE_S
    assert after_error(last, ErrorKind.RATE_LIMITED, "429", retry_after=5).delay_s >= 5
    # past the deadline (can_wait False) it ends as before; fatal errors never wait
    assert after_error(pos(tier_index=2, consecutive_errors=7), ErrorKind.OVERLOADED,
                       "503").action is Action.FAIL
    assert after_error(last, ErrorKind.AUTH, "bad key").action is Action.FAIL
    assert after_error(pos(tier_index=2, attempt_no=MAX_ATTEMPTS_PER_JOB, can_wait=True),
                       ErrorKind.OVERLOADED, "503").action is Action.FAIL  # still bounded
