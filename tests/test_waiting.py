"""Pure decisions for a job with no model to call: wait (no spinning), move up, or fail."""

from __future__ import annotations

import random

import pytest

from batchroute.waiting import MAX_DEFER_S, parse_duration, when_no_model

RNG = random.Random(1)


def test_durations() -> None:
    assert parse_duration("24h") == 86400
    assert parse_duration("90m") == 5400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("45") == 45
    for bad in ("soon", "0", "-5m", "5x"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_without_a_higher_tier_a_job_waits_until_the_deadline_then_fails() -> None:
    w = when_no_model(100.0, deadline=10_000.0, retry_in_s=40.0, waited=500, waiting_since=0.0,
                      higher_tier=False, cooldown_s=10.0, rng=RNG)
    assert w.action == "defer" and 40.0 <= w.delay_s <= 48.0  # until the breaker half-opens
    w = when_no_model(10_001.0, 10_000.0, 40.0, 500, 0.0, False, 10.0, RNG)
    assert (w.action, w.code) == ("fail", "deadline_exceeded")


def test_a_deferral_is_capped_and_never_sleeps_past_the_deadline() -> None:
    assert when_no_model(0.0, 1e9, 3600.0, 0, 0.0, False, 10.0, RNG).delay_s == MAX_DEFER_S
    assert when_no_model(0.0, 7.0, 3600.0, 0, 0.0, False, 10.0, RNG).delay_s == 7.0


def test_deferrals_scale_with_breaker_openings_not_with_time() -> None:
    """An hour-long outage with a breaker whose cooldown doubles up to 300 s: a waiting job
    re-checks a few dozen times, not once a second."""
    now, cooldown, checks = 0.0, 10.0, 0
    open_until = cooldown
    while now < 3600:
        w = when_no_model(now, 86400.0, max(0.0, open_until - now), checks, 0.0, False, 10.0, RNG)
        assert w.action == "defer"
        now += w.delay_s
        checks += 1
        if now >= open_until:  # the trials fail: re-opened for twice as long
            cooldown = min(300.0, cooldown * 2)
            open_until = now + cooldown
    assert checks < 40, checks


def test_with_a_higher_tier_the_job_moves_up_after_a_bounded_wait() -> None:
    assert when_no_model(5.0, 1e9, 10.0, 1, 0.0, True, 10.0, RNG).action == "defer"
    assert when_no_model(5.0, 1e9, 10.0, 5, 0.0, True, 10.0, RNG).action == "escalate"
    assert when_no_model(61.0, 1e9, 10.0, 1, 0.0, True, 10.0, RNG).action == "escalate"
    # ... and never sleeps past the moment it would move up
    assert when_no_model(55.0, 1e9, 300.0, 1, 0.0, True, 10.0, RNG).delay_s == pytest.approx(5.0)
