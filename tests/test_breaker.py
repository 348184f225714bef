from __future__ import annotations

import time

import pytest

from batchroute.breaker import BreakerConfig, BreakerState, RedisBreakers, allow, record

CFG = BreakerConfig(failures=3, window_s=10, cooldown_s=5, probe_timeout_s=2)


def test_opens_after_n_failures_in_the_window() -> None:
    s = BreakerState()
    assert not record(s, False, 0.0, CFG)
    assert not record(s, False, 1.0, CFG)
    assert record(s, False, 2.0, CFG)  # the third failure opens it
    assert allow(s, 3.0, CFG) == (False, False)


def test_old_failures_fall_out_of_the_window() -> None:
    s = BreakerState()
    record(s, False, 0.0, CFG)
    record(s, False, 1.0, CFG)
    assert not record(s, False, 20.0, CFG)  # the first two are older than window_s
    assert allow(s, 20.5, CFG) == (True, False)


def test_one_probe_after_cooldown_success_closes_failure_reopens() -> None:
    s = BreakerState()
    for t in (0.0, 0.1, 0.2):
        record(s, False, t, CFG)
    assert allow(s, 5.3, CFG) == (True, True)  # cooldown over: this caller probes
    assert allow(s, 5.4, CFG) == (False, False)  # nobody else while the probe is out
    assert record(s, False, 5.5, CFG)  # probe failed: open again
    assert allow(s, 6.0, CFG) == (False, False)
    assert allow(s, 10.6, CFG) == (True, True)
    record(s, True, 10.7, CFG)
    assert allow(s, 10.8, CFG) == (True, False)
    assert s.opened == 2


def test_a_lost_probe_frees_its_slot() -> None:
    s = BreakerState()
    for t in (0.0, 0.1, 0.2):
        record(s, False, t, CFG)
    assert allow(s, 5.3, CFG)[1]
    assert allow(s, 7.4, CFG) == (True, True)  # probe_timeout_s passed without a report


@pytest.mark.integration
def test_redis_breakers_are_shared_by_every_worker(redis_url: str) -> None:
    import redis

    cfg = BreakerConfig(failures=2, window_s=10, cooldown_s=0.5, probe_timeout_s=5)
    w1 = RedisBreakers(redis.Redis.from_url(redis_url), cfg)
    w2 = RedisBreakers(redis.Redis.from_url(redis_url), cfg)
    assert w1.allow("m") and w2.allow("m")
    w1.record("m", False)
    assert w2.record("m", False)  # failures seen by two workers add up
    assert not w1.allow("m") and not w2.allow("m")
    assert w1.snapshot()["m"]["state"] == "open"
    time.sleep(0.6)
    assert w2.allow("m")  # w2 gets the probe ...
    assert not w1.allow("m")  # ... and only w2
    w2.record("m", True)
    assert w1.allow("m")
    assert w1.snapshot()["m"]["state"] == "closed"


def test_successes_do_not_hide_a_failing_model() -> None:
    s = BreakerState()
    opened = False
    for i in range(9):  # fails one call in three
        opened = record(s, i % 3 != 0, float(i), CFG) or opened
    assert opened


def test_late_successes_from_calls_in_flight_do_not_close_it() -> None:
    s = BreakerState()
    for t in (0.0, 0.1, 0.2):
        record(s, False, t, CFG)
    record(s, True, 0.3, CFG)  # a call that started before the breaker opened
    assert allow(s, 1.0, CFG) == (False, False)
