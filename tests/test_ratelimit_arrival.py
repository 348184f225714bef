"""The pools log each call at the latest time it may reach the provider: while in flight at
its start plus its deadline, then at its settle time. So no delay between our admission
and the provider's counter (a stall, a slow call) can make a strict sliding-window
provider refuse a call, and pools pace at about limit / (window + latency), not
limit / (window + a fixed margin). Pure math, the memory backend on a fake clock against
the simulator's own limiter, and the Redis Lua deciding as the memory backend does."""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable

import pytest

from batchroute.ratelimit import (
    DEFER,
    GRANTED,
    RETRY,
    MemoryBackend,
    RedisBackend,
    Request,
    Scope,
    build_scope,
    window_start,
)
from batchroute.ratelimit.schedule import (
    DEFAULT_SAFETY_S,
    in_flight_until,
    settle_lead,
    settled_at,
)
from batchroute.sim.limits import Limit, RateLimiter

from .test_ratelimit import Clock

# ---- pure math --------------------------------------------------------------------------------


def test_an_entry_is_the_latest_arrival_known() -> None:
    assert in_flight_until(100.0, None, 95.0) == 195.0  # in flight: until its deadline
    assert in_flight_until(100.0, 0.5, 95.0) == 100.5  # a provider's cap
    assert in_flight_until(100.0, 500.0, 95.0) == 195.0  # never past the deadline
    assert settled_at(195.0, 100.07) == 100.07  # settled: it arrived by then
    assert settled_at(100.5, 103.0) == 100.5  # a cap stays a cap


def test_window_start_with_calls_in_flight_clamped_to_now() -> None:
    # two settled entries and one in flight (logged at its deadline, 190)
    entries = [(0.0, 40.0), (1.0, 30.0), (190.0, 30.0)]
    assert window_start(entries, 100.0, 5.0, 50.0, 100, 10.0) == pytest.approx(11.0)
    # needing the one in flight: safe only after its deadline...
    assert window_start(entries, 100.0, 5.0, 80.0, 100, 10.0) == pytest.approx(200.0)
    # ...but it could be a window after it settles, at the earliest now
    assert window_start(entries, 100.0, 5.0, 80.0, 100, 10.0, clamp=5.0) == pytest.approx(15.0)


# ---- the memory backend on a fake clock, against the simulator's limiter ----------------------

Duration = Callable[[random.Random], float]


def _run_calls(scope: Scope, costs: list[int], rng: random.Random, duration: Duration,
               arrive_at_end: Callable[[random.Random], bool],
               report_processing: bool = False) -> list[tuple[float, int]]:
    """Each call admitted as early as the pool grants it (many workers), taking
    ``duration`` and reaching the provider at its start or, when ``arrive_at_end``, just
    before its reply (the worst case: a stall before the provider counted it). Settles
    happen at each call's end, in time order; with ``report_processing`` each reports
    the time from its count to its reply, less 1 ms (openai-processing-ms). Returns the
    provider's arrivals."""
    clock = Clock()
    be = MemoryBackend(clock)
    ends: list[tuple[float, str, float]] = []

    def advance(to: float) -> None:
        while ends and ends[0][0] <= to:
            at, holder, lead = heapq.heappop(ends)
            clock.t = max(clock.t, at)
            be.settle([scope], holder, 0, 0.0, [False], 0.0, lead)
        clock.t = max(clock.t, to)

    arrivals = []
    for i, cost in enumerate(costs):
        while True:
            o = be.acquire([scope], Request(cost, f"h{i}", 30.0, horizon_s=1.0, bound_s=60.0))
            if o.kind == GRANTED:
                start = o.now + o.wait_s
                d = duration(rng)
                arrive = d * 0.999 if arrive_at_end(rng) else 0.0
                lead = max(0.0, d - arrive - 0.001) if report_processing else 0.0
                heapq.heappush(ends, (start + d, f"h{i}", lead))
                arrivals.append((start + arrive, cost))
                break
            advance(clock.t + max(o.wait_s, 0.001))
    return sorted(arrivals)


def _refused(arrivals: list[tuple[float, int]], window: float, rpm: int | None,
             tpm: int | None) -> int:
    now = [0.0]
    provider = RateLimiter(window_s=window, clock=lambda: now[0])
    refused = 0
    for t, c in arrivals:
        now[0] = t
        refused += not provider.acquire([Limit("*", rpm, tpm)], c).allowed
    return refused


def _stalls(rng: random.Random) -> float:
    """Mostly 30-70 ms; 3% stall 1-5 s (a starved worker, a GC pause, a slow gateway)."""
    return rng.uniform(1.0, 5.0) if rng.random() < 0.03 else rng.uniform(0.03, 0.07)


@pytest.mark.parametrize(("rpm", "tpm", "window"),
                         [(10, None, 60.0), (600, 60000, 60.0), (100, 10000, 10.0),
                          (None, 300, 2.0)])
def test_no_stall_makes_a_strict_provider_refuse(rpm: int | None, tpm: int | None,
                                                 window: float) -> None:
    rng = random.Random(11)
    scope = build_scope("p", "k", window, rpm, tpm, None, safety_s=None)  # uncapped: strict
    costs = [rng.randint(20, 200) for _ in range(2000)]
    arrivals = _run_calls(scope, costs, rng, _stalls, lambda r: r.random() < 0.5)
    assert _refused(arrivals, window, rpm, tpm) == 0


def test_a_capped_margin_is_what_stalls_break() -> None:
    """The same calls with the old fixed 0.5 s margin (a provider's rate_safety_s):
    stalls longer than it get refused. What an uncapped pool structurally avoids."""
    rng = random.Random(11)
    scope = build_scope("p", "k", 10.0, 100, 10000, None, safety_s=0.5)
    costs = [rng.randint(20, 200) for _ in range(2000)]
    arrivals = _run_calls(scope, costs, rng, _stalls, lambda r: r.random() < 0.5)
    assert _refused(arrivals, 10.0, 100, 10000) > 0


def test_pace_is_the_window_plus_the_latency() -> None:
    """A fresh window's allowance at once, then each a window after its reply: 1,000
    requests at 100 a 10 s window with 50 ms calls take 9 windows of 10.05 s (the old
    fixed 0.5 s margin: 9 of 10.5 s). Calls of 1 s take 9 of 11 s; a provider's cap of
    0.5 s (rate_safety_s) brings them back to 10.5 s, giving up strictness past it."""
    def last_start(safety: float | None, d: float) -> float:
        scope = build_scope("p", "k", 10.0, 100, None, None, safety_s=safety)
        arrivals = _run_calls(scope, [1] * 1000, random.Random(3), lambda r: d,
                              lambda r: False)
        assert [t - 1000.0 for t, _ in arrivals[:100]] == [0.0] * 100  # all at once
        assert _refused(arrivals, 10.0, 100, None) == 0
        return arrivals[-1][0] - 1000.0

    assert last_start(None, 0.05) == pytest.approx(9 * 10.05, abs=1e-3)
    assert last_start(0.5, 0.05) == pytest.approx(9 * 10.05, abs=1e-3)
    assert last_start(None, 1.0) == pytest.approx(9 * 11.0, abs=1e-3)
    assert last_start(0.5, 1.0) == pytest.approx(9 * 10.5, abs=1e-3)
    # Long LLM calls: uncapped they would pace a whole reply behind the window (20 s
    # calls: 9 of 30 s); the default cap counts them at admission + 2 s (9 of 12 s).
    assert last_start(None, 20.0) == pytest.approx(9 * 30.0, abs=1e-3)
    assert last_start(DEFAULT_SAFETY_S, 20.0) == pytest.approx(9 * 12.0, abs=1e-3)
    assert DEFAULT_SAFETY_S == 2.0  # and fast calls still count until their reply:
    assert last_start(DEFAULT_SAFETY_S, 0.05) == pytest.approx(9 * 10.05, abs=1e-3)


def test_a_call_in_flight_holds_its_entry_until_it_settles() -> None:
    clock = Clock()
    be = MemoryBackend(clock)
    s = [build_scope("p", "k", 10.0, 2, None, None, safety_s=None)]
    for h in ("a", "b"):
        assert be.acquire(s, Request(1, h, 30.0, bound_s=60.0)).kind == GRANTED
    clock.sleep(0.1)
    be.settle(s, "a", 0, 0.0, [False], 0.0)  # a's reply at 0.1 s; b still running
    clock.sleep(10.0)  # a left the window (at 10.1 s); b would have, at its admission
    assert be.acquire(s, Request(1, "c", 30.0, bound_s=60.0)).kind == GRANTED
    early = be.acquire(s, Request(1, "d", 30.0, bound_s=60.0, horizon_s=0.5))
    # b is still in flight: no safe start, put back for a window after "now" at least
    assert (early.kind, early.reason) == (DEFER, "rpm")
    assert early.wait_s == pytest.approx(10.0, abs=1e-3)
    clock.sleep(2.0)
    be.settle(s, "b", 0, 0.0, [False], 0.0)  # b's reply at 12.1 s
    clock.sleep(9.5)
    late = be.acquire(s, Request(1, "d", 30.0, bound_s=60.0))
    assert (late.kind, round(late.wait_s, 3)) == (GRANTED, 0.5)  # at 22.1 s: slept


def test_a_lost_settle_frees_the_entry_after_the_calls_deadline() -> None:
    clock = Clock()
    be = MemoryBackend(clock)
    s = [build_scope("p", "k", 10.0, 1, None, None, safety_s=None)]
    assert be.acquire(s, Request(1, "lost", 30.0, bound_s=60.0)).kind == GRANTED
    clock.sleep(69.5)  # its worker died: no settle; logged at 60 s, gone at 70 s
    o = be.acquire(s, Request(1, "next", 30.0, bound_s=60.0))
    assert (o.kind, round(o.wait_s, 3)) == (GRANTED, 0.5)


def test_the_limiter_bounds_a_call_in_flight_by_its_providers_deadline() -> None:
    """timeout_s 5 x deadline_factor 3 + 30 s of grace: a call never settled counts at
    45 s; with its settle, at its reply."""
    from batchroute.ratelimit import Limiter

    from .test_ratelimit import FakeJob, _config

    clock = Clock()
    cfg = _config(provider="rpm = 1\nrate_window_s = 10")
    lim = Limiter(cfg, MemoryBackend(clock), sleep=clock.sleep, safety_s=None)
    m, p = cfg.models["m"], cfg.providers["p"]
    assert p.deadline_s == 15.0
    assert not lim.acquire(m, p, FakeJob(1)).deferred  # never settled
    clock.sleep(54.5)
    g = lim.acquire(m, p, FakeJob(2))
    assert not g.deferred and g.waited_s == pytest.approx(0.5, abs=1e-5)  # left at 55 s
    clock.sleep(0.2)
    lim.settle(g)  # its reply at 55.2 s
    clock.sleep(9.5)
    assert lim.acquire(m, p, FakeJob(3)).waited_s == pytest.approx(0.5, abs=1e-5)


def test_a_short_window_retries_while_a_call_is_about_to_settle() -> None:
    clock = Clock()
    be = MemoryBackend(clock)
    s = [build_scope("p", "k", 0.5, 1, None, None, safety_s=None)]
    assert be.acquire(s, Request(1, "a", 30.0, bound_s=60.0)).kind == GRANTED
    o = be.acquire(s, Request(1, "b", 30.0, bound_s=60.0, horizon_s=1.0))
    assert (o.kind, o.reason) == (RETRY, "rpm")  # could be safe within a worker's sleep
    assert o.wait_s == pytest.approx(0.5, abs=1e-3)


# ---- Redis: the Lua logs and restamps as the memory backend does ------------------------------

@pytest.mark.integration
def test_redis_and_memory_backends_settle_alike(redis_url: str) -> None:
    import time

    import redis

    scopes = [build_scope("s", "batchroute:rl:{s}", 2.0, 2, 300, None, safety_s=None),
              build_scope("s/m", "batchroute:rl:{s}:model:m", 2.0, None, 100, None,
                          safety_s=None)]
    red = RedisBackend(redis.Redis.from_url(redis_url))
    clock = Clock()
    mem = MemoryBackend(clock)

    def both(req: Request) -> tuple[str, float, str]:
        a, b = mem.acquire(scopes, req), red.acquire(scopes, req)
        assert (a.kind, a.reason) == (b.kind, b.reason)
        assert a.wait_s == pytest.approx(b.wait_s, abs=0.05)
        return a.kind, round(a.wait_s, 1), a.reason

    def settle(holder: str, delta: int = 0) -> None:
        mem.settle(scopes, holder, delta, 0.0, [False, False], 0.0)
        red.settle(scopes, holder, delta, 0.0, [False, False], 0.0)

    def sleep(s: float) -> None:
        clock.sleep(s)
        time.sleep(s)

    def req(holder: str) -> Request:
        return Request(50, holder, 30.0, horizon_s=0.5, bound_s=60.0)

    assert [both(req(h))[0] for h in "ab"] == [GRANTED] * 2
    assert both(req("c")) == (DEFER, 2.0, "rpm")  # both in flight: a window from now
    sleep(0.3)
    settle("a")  # a settles at 0.3 s (both logs), b stays in flight
    sleep(2.1)  # 2.4 s: a left the window, b has not
    assert both(req("c"))[0] == GRANTED
    assert both(req("d")) == (DEFER, 2.0, "rpm")
    settle("b", -20)  # b settles at 2.4 s, 30 tokens
    assert both(req("d")) == (DEFER, 2.0, "rpm")
    sleep(1.6)  # b leaves at 4.4 s: 0.4 s to go, slept in the worker
    kind, wait, _ = both(req("d"))
    assert kind == GRANTED and wait == pytest.approx(0.4, abs=0.06)


# ---- the provider's own processing time dates a settled call earlier -------------------------

def test_settle_lead_is_bounded_by_the_time_since_admission() -> None:
    assert settle_lead(0.3, 10.0, 9.0) == pytest.approx(0.3)
    assert settle_lead(5.0, 10.0, 9.0) == pytest.approx(1.0)  # never before admission
    assert settle_lead(0.3, 10.0, 0.0) == pytest.approx(0.3)  # admission unknown
    for bad in (-1.0, 0.0, math.nan, math.inf, -math.inf):
        assert settle_lead(bad, 10.0, 9.0) == 0.0
    assert settle_lead(0.3, 10.0, 10.5) == 0.0  # clocks apart: not dated before admission


def test_processing_ms_header_is_read_bounded_and_optional() -> None:
    from batchroute.providers.openai import processing_seconds

    assert processing_seconds({"openai-processing-ms": "250"}, 1.0) == pytest.approx(0.25)
    assert processing_seconds({"llm_provider-openai-processing-ms": "40.5"}, 1.0) == \
        pytest.approx(0.0405)
    assert processing_seconds({"openai-processing-ms": "9000"}, 1.2) == pytest.approx(1.2)
    for bad in ("-5", "nan", "inf", "1e400", "soon", ""):
        assert processing_seconds({"openai-processing-ms": bad}, 1.0) is None
    assert processing_seconds({}, 1.0) is None


def test_a_call_dated_by_its_processing_time_frees_the_window_that_much_earlier() -> None:
    clock = Clock()
    be = MemoryBackend(clock)
    s = [build_scope("p", "k", 10.0, 1, None, None, safety_s=None)]
    assert be.acquire(s, Request(1, "a", 30.0, bound_s=60.0)).kind == GRANTED
    clock.sleep(3.0)  # a 3 s call, 2.9 s of it spent at the provider after its count
    be.settle(s, "a", 0, 0.0, [False], 0.0, lead_s=2.9)
    clock.sleep(7.2)  # 10.2 s: counted at 0.1 s, out of the window since 10.1 s
    assert be.acquire(s, Request(1, "b", 30.0, bound_s=60.0)).kind == GRANTED
    # Without the lead it would have counted until its reply, at 3 s:
    be2 = MemoryBackend(clock2 := Clock())
    assert be2.acquire(s, Request(1, "a", 30.0, bound_s=60.0)).kind == GRANTED
    clock2.sleep(3.0)
    be2.settle(s, "a", 0, 0.0, [False], 0.0)
    clock2.sleep(7.2)
    assert be2.acquire(s, Request(1, "b", 30.0, bound_s=60.0, horizon_s=0.5)).kind == DEFER


def test_processing_time_keeps_a_strict_provider_at_zero_refusals() -> None:
    """The stalled calls above, each reporting the time it spent at the provider after its
    count (less 1 ms of network): dated that much earlier, 0 refusals still, and the last
    call is admitted sooner than when every call counts until its reply."""
    window, rpm, tpm = 10.0, 100, 10000
    scope = build_scope("p", "k", window, rpm, tpm, None, safety_s=None)
    runs = {}
    for lead in (False, True):
        rng = random.Random(11)
        costs = [rng.randint(20, 200) for _ in range(2000)]
        arrivals = _run_calls(scope, costs, rng, _stalls, lambda r: r.random() < 0.5,
                              report_processing=lead)
        assert _refused(arrivals, window, rpm, tpm) == 0
        runs[lead] = arrivals[-1][0]
    assert runs[True] < runs[False] - 0.5  # ~20 windows, each ~latency sooner


@pytest.mark.integration
def test_redis_dates_a_settled_call_by_its_processing_time(redis_url: str) -> None:
    import time

    import redis

    red = RedisBackend(redis.Redis.from_url(redis_url))
    s = [build_scope("lead", "batchroute:rl:{lead-test}", 1.0, 1, None, None, safety_s=None)]
    req = Request(1, "a", 30.0, horizon_s=0.2, bound_s=60.0)
    assert red.acquire(s, req).kind == GRANTED
    time.sleep(0.5)
    red.settle(s, "a", 0, 0.0, [False], 0.0, lead_s=0.45)  # counted at ~0.05 s
    time.sleep(0.65)  # ~1.15 s: a's count has left the 1 s window
    b = red.acquire(s, Request(1, "b", 30.0, horizon_s=0.2, bound_s=60.0))
    assert b.kind == GRANTED
    time.sleep(0.5)
    # An absurd lead is bounded by the time since admission: b counts at its admission.
    red.settle(s, "b", 0, b.now + b.wait_s, [False], 0.0, lead_s=1e9)
    later = red.acquire(s, Request(1, "c", 30.0, horizon_s=0.2, bound_s=60.0))
    assert later.kind == DEFER and later.wait_s == pytest.approx(0.5, abs=0.1)
