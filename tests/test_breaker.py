"""The breaker's state machine: opens on a failure rate, trials a share of calls, backs off."""

from __future__ import annotations

import time

import pytest

from batchroute.breaker import (
    BreakerConfig,
    BreakerState,
    RedisBreakers,
    allow,
    record,
    retry_in,
    trial_verdict,
)

CFG = BreakerConfig(min_calls=10, failure_rate=0.5, window_s=10, cooldown_s=5,
                    max_cooldown_s=12, half_open_calls=4, probe_timeout_s=2)


def _open(s: BreakerState, at: float = 0.0) -> None:
    for i in range(CFG.min_calls):
        record(s, False, at + i * 0.01, CFG)
    assert s.open_until > 0


def test_a_model_failing_a_minority_of_calls_stays_closed() -> None:
    s = BreakerState()
    for i in range(1000):  # 30% transient faults: the model still answers 70%
        assert not record(s, i % 10 >= 3, i * 0.01, CFG)
    assert allow(s, 10.0, CFG) == (True, False)


def test_opens_on_the_failure_rate_once_enough_calls_were_seen() -> None:
    s = BreakerState()
    for i in range(9):  # all failed, but fewer than min_calls
        assert not record(s, False, i * 0.1, CFG)
    assert record(s, False, 0.95, CFG)  # the tenth: 10 calls, 100% failed
    assert allow(s, 1.0, CFG) == (False, False)
    assert retry_in(s, 1.0) == pytest.approx(0.95 + 5 - 1.0)


def test_half_failing_opens_it_and_old_outcomes_age_out() -> None:
    s = BreakerState()
    for i in range(8):
        record(s, True, i * 0.1, CFG)
    for i in range(7):
        assert not record(s, False, 1 + i * 0.1, CFG)  # 7 of 15 failed: under the rate
    assert record(s, False, 2.0, CFG)  # 8 of 16
    s = BreakerState()
    for i in range(9):
        record(s, False, i * 0.1, CFG)
    assert not record(s, False, 30.0, CFG)  # the first nine left the 10 s window


def test_half_open_lets_a_limited_share_through_and_successes_close_it() -> None:
    s = BreakerState()
    _open(s)
    assert allow(s, 5.2, CFG) == (True, True)
    assert [allow(s, 5.2, CFG)[0] for _ in range(4)] == [True, True, True, False]
    for _ in range(3):  # 3 of 4 trials succeed: more than the failure rate allows to fail
        record(s, True, 5.3, CFG)
    assert allow(s, 5.4, CFG) == (True, False)  # closed
    assert s.streak == 0


def test_failed_trials_reopen_with_a_growing_capped_cooldown() -> None:
    s = BreakerState()
    _open(s)
    cooldowns = []
    now = 0.09
    for _ in range(4):
        cooldowns.append(round(s.open_until - now, 2))
        now = s.open_until + 0.01
        assert allow(s, now, CFG)[1] and allow(s, now, CFG)[1]
        assert not record(s, False, now, CFG)
        assert record(s, False, now, CFG)  # 2 of 4 trials failed: re-opened
    assert cooldowns == [5.0, 10.0, 12.0, 12.0]
    assert s.opened == 5


def test_lost_trials_free_their_slots() -> None:
    s = BreakerState()
    _open(s)
    for _ in range(4):
        assert allow(s, 5.2, CFG)[0]
    assert not allow(s, 6.0, CFG)[0]
    assert allow(s, 7.3, CFG) == (True, True)  # probe_timeout_s passed without reports


def test_late_outcomes_from_calls_in_flight_are_ignored_while_open() -> None:
    s = BreakerState()
    _open(s)
    for _ in range(10):
        record(s, True, 0.3, CFG)
    assert allow(s, 1.0, CFG) == (False, False)


def test_trial_verdict_decides_as_soon_as_the_rest_cannot_change_it() -> None:
    cfg = BreakerConfig(half_open_calls=10, failure_rate=0.5)
    assert trial_verdict(5, 0, cfg) is None
    assert trial_verdict(6, 0, cfg) is True
    assert trial_verdict(0, 5, cfg) is False
    assert trial_verdict(4, 4, cfg) is None


def test_old_failures_setting_reads_as_min_calls() -> None:
    assert BreakerConfig.from_dict({"failures": "4", "cooldown_s": 2}).min_calls == 4
    assert BreakerConfig.from_dict({"min_calls": 7, "failure_rate": "0.3"}).failure_rate == 0.3


@pytest.mark.integration
def test_redis_breakers_are_shared_by_every_worker(redis_url: str) -> None:
    import redis

    cfg = BreakerConfig(min_calls=4, window_s=10, cooldown_s=0.5, half_open_calls=2,
                        probe_timeout_s=5)
    key = f"shared-{time.time_ns()}"
    w1 = RedisBreakers(redis.Redis.from_url(redis_url), cfg, closed_ttl_s=0.0)
    w2 = RedisBreakers(redis.Redis.from_url(redis_url), cfg, closed_ttl_s=0.0)
    assert w1.allow(key) and w2.allow(key)
    w1.record(key, True)
    w1.record(key, False)
    assert not w2.record(key, False)  # 2 of 3 failed, but fewer than min_calls
    assert w2.record(key, False)  # outcomes seen by two workers add up: 3 of 4 failed
    assert not w1.allow(key) and not w2.allow(key)
    assert 0.3 < w1.retry_in(key) <= 0.5
    assert w1.snapshot()[key]["state"] == "open"
    time.sleep(0.6)
    assert w2.allow(key) and w1.allow(key)  # two trial calls ...
    assert not w1.allow(key)  # ... and no more
    w2.record(key, True)
    w1.record(key, True)
    assert w1.allow(key) and w1.retry_in(key) == 0
    assert w1.snapshot()[key]["state"] == "closed"


@pytest.mark.integration
def test_redis_successes_trusted_locally_still_count_toward_the_rate(redis_url: str) -> None:
    import redis

    cfg = BreakerConfig(min_calls=10, window_s=30, cooldown_s=30)
    key = f"rate-{time.time_ns()}"
    b = RedisBreakers(redis.Redis.from_url(redis_url), cfg, closed_ttl_s=30)
    assert b.allow(key)
    for _ in range(20):
        b.record(key, True)  # no Redis call: counted locally
    for _ in range(15):
        assert not b.record(key, False)  # 15 of 35 failed: under 50%
    assert b.allow(key)
    assert b.snapshot()[key]["recent_ok"] == 20
