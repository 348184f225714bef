"""Global rate-limit pools: the GCRA math, both backends, several processes on one Redis,
a killed holder, the CLI, an embedded run and real Celery workers against a strict sim."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batchroute.completion import Completion, Usage
from batchroute.config import parse_config
from batchroute.providers.base import ErrorKind, ProviderError
from batchroute.ratelimit import (
    DEFAULT_SAFETY_S,
    DEFER,
    GRANTED,
    MAX_DEFER_S,
    RETRY,
    Limiter,
    MemoryBackend,
    Rate,
    RedisBackend,
    Request,
    Scope,
    adjust,
    available,
    build_scope,
    charged_tokens,
    commit,
    completion_cap,
    earliest,
    header_block_s,
    window_start,
)

from .conftest import REDIS_URL, wait_for


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def _config(provider: str = "", model: str = "", simulator: str = "") -> Any:
    return parse_config(_toml(provider, model, simulator), "<test>")


def _toml(provider: str = "", model: str = "", simulator: str = "",
          base_url: str = "sim://") -> dict[str, Any]:
    import tomllib

    return tomllib.loads(f"""
[providers.p]
base_url = "{base_url}"
timeout_s = 5
{provider}
[models.m]
provider = "p"
tier = 1
price = {{ input_per_mtok = 1, output_per_mtok = 1 }}
{model}
[models.other]
provider = "p"
tier = 2
price = {{ input_per_mtok = 1, output_per_mtok = 1 }}
[tasks.default]
ladder = [1]
validators = []
[simulator]
{simulator}
""")


class FakeJob:
    def __init__(self, n: int = 1, prompt: int = 20, max_tokens: int | None = 30) -> None:
        self.id, self.batch_id, self.attempt_no = f"j{n}", "b1", 1
        self.body: dict[str, Any] = {"messages": [{"role": "user", "content": "x"}]}
        if max_tokens is not None:
            self.body["max_tokens"] = max_tokens
        self.prompt_tokens_est = prompt


# ---- pure math ----------------------------------------------------------------------------

def test_rate_parameters() -> None:
    r = Rate(600, 60.0, burst=1)
    assert r.interval == pytest.approx(0.1) and r.tolerance == pytest.approx(0.1)
    t = Rate(60000, 60.0, burst=1000, safety_s=0.5)
    assert 1 / t.interval == pytest.approx(59001 / 60.5)
    for bad in (dict(limit=0), dict(limit=10, burst=11), dict(limit=10, window_s=0)):
        with pytest.raises(ValueError):
            Rate(**bad)


def _greedy(rate: Rate, costs: list[int], rng: random.Random,
            idle: float = 0.05) -> list[tuple[float, int]]:
    """Admit each request as early as GCRA allows, with random idle gaps in between."""
    tat, now, out = 0.0, 0.0, []
    for c in costs:
        if rng.random() < idle:
            now += rng.uniform(0, 2 * rate.window_s)  # idle: the bucket refills
        start = earliest(tat, now, c, rate)
        tat = commit(tat, start, c, rate)
        out.append((start, c))
        now = start
    return out


def _max_in_window(events: list[tuple[float, int]], window: float) -> int:
    """Most units in any window (t - window, t], as a strict provider counts them. With
    no safety margin the limit is met exactly at the window's edge, so 1 us of float and
    Redis rounding counts as outside."""
    events = sorted(events)
    best = total = lo = 0
    for t, c in events:
        total += c
        while events[lo][0] <= t - window + 1e-6:
            total -= events[lo][1]
            lo += 1
        best = max(best, total)
    return best


@pytest.mark.parametrize(("limit", "burst", "window", "safety"),
                         [(10, 1, 60.0, 0.0), (600, 1, 60.0, 0.5), (60000, 1000, 60.0, 0.0),
                          (1000, 50, 2.0, 0.3), (3, 3, 1.0, 0.0)])
def test_gcra_never_exceeds_the_limit_in_any_sliding_window(limit: int, burst: int,
                                                            window: float,
                                                            safety: float) -> None:
    rng = random.Random(limit)
    rate = Rate(limit, window, burst, safety)
    costs = [rng.randint(1, burst) for _ in range(3000)]
    admitted = _greedy(rate, costs, rng)
    assert _max_in_window(admitted, window) <= limit
    # ...and still when each request reaches the provider up to `safety` seconds late.
    late = [(t + rng.uniform(0, safety), c) for t, c in admitted]
    assert _max_in_window(late, window) <= limit


def test_gcra_uses_the_allowance_fully() -> None:
    rate = Rate(600, 60.0, burst=1, safety_s=0.5)
    admitted = _greedy(rate, [1] * 6000, random.Random(1), idle=0.0)
    span = admitted[-1][0] - admitted[0][0]
    assert len(admitted) / span * 60 == pytest.approx(600 * 60 / 60.5, rel=1e-3)
    tokens = Rate(60000, 60.0, burst=1000, safety_s=0.5)
    got = _greedy(tokens, [100] * 3000, random.Random(2), idle=0.0)
    per_min = sum(c for _, c in got) / (got[-1][0] - got[0][0]) * 60
    assert per_min / 60000 > 0.97  # the price of strictness: (B-1)/L + S/W


def test_oversize_request_waits_for_a_full_bucket_only() -> None:
    rate = Rate(100, 10.0, burst=5)
    assert earliest(0.0, 50.0, 20, rate) == 50.0  # full bucket: goes at once
    tat = commit(0.0, 50.0, 20, rate)
    assert earliest(tat, 50.0, 1, rate) == pytest.approx(tat + rate.interval - rate.tolerance)


def test_reconciliation_moves_the_schedule() -> None:
    rate = Rate(1000, 60.0, burst=100)
    tat = commit(0.0, 10.0, 100, rate)
    assert available(tat, 10.0, rate) == pytest.approx(0.0)
    assert available(adjust(tat, -40, rate), 10.0, rate) == pytest.approx(40.0)  # refund
    assert adjust(tat, 25, rate) == pytest.approx(tat + 25 * rate.interval)  # debt


def test_charged_tokens_follow_what_the_provider_counts() -> None:
    assert completion_cap({"max_tokens": 30}) == 30 and completion_cap({}) is None
    assert charged_tokens(Usage(100, 7), cap=30) == 130  # prompt + the max_tokens asked for
    assert charged_tokens(Usage(100, 7), cap=None) == 107  # no cap: what was produced
    assert charged_tokens(Usage(0, 0), cap=30) is None  # no usage reported: keep reservation


def test_rate_limit_headers_block_until_the_reset() -> None:
    assert header_block_s({"x-ratelimit-remaining-requests": "5"}) == 0.0
    assert header_block_s({"x-ratelimit-remaining-requests": "0",
                           "x-ratelimit-reset-requests": "1.5s",
                           "x-ratelimit-remaining-tokens": "0",
                           "x-ratelimit-reset-tokens": "250ms"}) == pytest.approx(1.5)
    assert header_block_s({"anthropic-ratelimit-tokens-remaining": "0",
                           "anthropic-ratelimit-tokens-reset": "2030-01-01T00:00:03Z"},
                          now_wall=1893456000.0) == pytest.approx(3.0)
    assert header_block_s({"x-ratelimit-remaining-tokens": "0",
                           "x-ratelimit-reset-tokens": "6m0s"}) == 60.0  # capped


def test_limits_in_the_config_are_checked() -> None:
    from batchroute.config import ConfigError

    cfg = _config(provider="rpm = 100\ntpm = 9000\nmax_concurrency = 8",
                  model="rpm = 10\nmax_concurrency = 2")
    assert (cfg.models["m"].rpm, cfg.models["m"].tpm, cfg.models["m"].max_concurrency) == (
        10, None, 2)
    assert cfg.providers["p"].rate_window_s == 60.0
    for bad in (("tpm = 0", ""), ("", "rpm = -1"), ("rate_window_s = 0", "")):
        with pytest.raises(ConfigError):
            _config(provider=bad[0], model=bad[1])



def test_a_provider_may_set_its_safety_margin() -> None:
    """By default a call counts until its reply, or admission + 2 s if it is slower (long
    calls pace at the window + 2 s, not + their latency); a provider may set its own
    cap, and only there."""
    from batchroute.config import ConfigError

    cfg = _config(provider="rpm = 100\nrate_safety_s = 0.1\n[providers.q]\n"
                           'base_url = "sim://"\nrpm = 100')
    lim = Limiter(cfg, MemoryBackend())
    scopes = lim.scopes(cfg.models["m"])
    assert scopes and all(s.arrival_cap_s == 0.1 for s in scopes)
    other = replace(cfg.models["m"], name="mq", provider="q")
    assert DEFAULT_SAFETY_S == 2.0
    assert all(s.arrival_cap_s == 2.0 for s in lim.scopes(other))
    assert cfg.providers["q"].rate_safety_s is None
    with pytest.raises(ConfigError):
        _config(provider="rate_safety_s = -0.1")

# ---- the in-memory backend and the Limiter (fake clock) -------------------------------------

def _scope(rpm: int | None = None, tpm: int | None = None, conc: int | None = None,
           window: float = 60.0, key: str = "k") -> Scope:
    return build_scope("p", key, window, rpm, tpm, conc, safety_s=0.0)


def test_memory_backend_spends_the_window_then_defers_to_when_it_frees_up() -> None:
    clock = Clock()
    be = MemoryBackend(clock)
    s = [_scope(rpm=3)]  # 3 requests per 60 s window
    kinds = [be.acquire(s, Request(1, f"h{i}", 10.0)) for i in range(7)]
    # the window's whole allowance goes at once, as the provider's own window permits
    assert [(o.kind, o.wait_s) for o in kinds[:3]] == [(GRANTED, 0.0)] * 3
    # the rest wait for the window to free up: a window's worth then, the next paced after
    assert [(o.kind, o.reason) for o in kinds[3:]] == [(DEFER, "rpm")] * 4
    assert [round(o.wait_s, 3) for o in kinds[3:]] == [60.0, 60.0, 60.0, 80.0]
    assert be.usage(s[0])["deferred"] == 4 and be.usage(s[0])["requests"] == 3
    clock.sleep(59.5)  # half a second before the first admission leaves the window:
    late = be.acquire(s, Request(1, "late", 10.0))
    assert (late.kind, round(late.wait_s, 3)) == (GRANTED, 0.5)  # slept in the worker


def test_deferral_beyond_the_cap_takes_no_turn() -> None:
    be = MemoryBackend(Clock())
    s = [_scope(rpm=2, window=2.0)]
    for i in range(5):  # 2 granted, then turns at 2, 2 and 3 s
        assert not be.acquire(s, Request(1, f"h{i}", 10.0, max_defer_s=3.5)).capped
    capped = be.acquire(s, Request(1, "late", 10.0, max_defer_s=3.5))  # 4 s away
    assert capped.kind == DEFER and capped.capped
    again = be.acquire(s, Request(1, "late2", 10.0, max_defer_s=3.5))
    assert again.capped and again.wait_s == capped.wait_s  # the queue did not grow


def test_concurrency_slots_retry_then_free() -> None:
    clock = Clock()
    be = MemoryBackend(clock)
    s = [_scope(conc=1)]
    assert be.acquire(s, Request(1, "a", 10.0)).kind == GRANTED
    busy = be.acquire(s, Request(1, "b", 10.0))
    assert (busy.kind, busy.reason) == (RETRY, "concurrency")
    clock.sleep(0.5)
    be.settle(s, "a", 0, 1000.0, [True], 0.0)
    assert be.acquire(s, Request(1, "b", 10.0)).kind == GRANTED
    assert be.usage(s[0])["in_flight"] == 1


def test_limiter_sleeps_briefly_then_defers_with_a_bounded_countdown() -> None:
    cfg = _config(provider="rpm = 2\nrate_window_s = 2")
    slept: list[float] = []
    clock = Clock()
    lim = Limiter(cfg, MemoryBackend(clock), sleep=slept.append, safety_s=0.0)
    m, p = cfg.models["m"], cfg.providers["p"]
    g1, g2, g3 = (lim.acquire(m, p, FakeJob(i)) for i in (1, 2, 3))
    assert not g1.deferred and not g2.deferred and g2.waited_s == 0 and not slept
    # 2 s: back to the queue, returning half a horizon early to sleep the rest
    assert g3.deferred and g3.defer_s == pytest.approx(1.5)
    assert g3.pool == "p" and g3.reason == "rpm"
    clock.sleep(1.5)
    g4 = lim.acquire(m, p, FakeJob(4))
    assert not g4.deferred and slept == [pytest.approx(0.5, abs=1e-5)]  # 0.5 s: slept in the worker
    assert MAX_DEFER_S < 3600 / 4  # far below the broker's visibility timeout


def test_limiter_without_limits_never_calls_the_backend() -> None:
    class Boom(MemoryBackend):
        def acquire(self, *a: Any, **k: Any) -> Any:
            raise AssertionError("no limits configured: no backend call")

    cfg = _config()
    lim = Limiter(cfg, Boom())
    g = lim.acquire(cfg.models["m"], cfg.providers["p"], FakeJob())
    assert not g.scopes and not g.deferred
    lim.settle(g, None, ProviderError(ErrorKind.RATE_LIMITED, "x", 429, 5.0))  # no-op


def test_settle_reconciles_and_429s_block_the_narrowest_pool() -> None:
    clock = Clock()
    be = MemoryBackend(clock)
    cfg = _config(provider="tpm = 6000", model="rpm = 100")
    lim = Limiter(cfg, be, sleep=clock.sleep, safety_s=0.0)
    m, p = cfg.models["m"], cfg.providers["p"]
    provider_pool, model_pool = lim.scopes(m)
    assert (provider_pool.name, model_pool.name) == ("p", "p/m")
    g = lim.acquire(m, p, FakeJob(prompt=50, max_tokens=None))  # reserves 50 + 512
    assert g.reserved == 562
    done = Completion(content="ok", finish_reason="stop", usage=Usage(48, 12), model="m")
    lim.settle(g, done)  # no cap asked: charged 48 + 12 = 60
    assert be.usage(provider_pool)["tokens"] == 60
    g = lim.acquire(m, p, FakeJob(2))
    lim.settle(g, None, ProviderError(ErrorKind.RATE_LIMITED, "slow down", 429, 2.0))
    assert be.usage(model_pool)["blocked_s"] == pytest.approx(2.0)
    assert be.usage(provider_pool)["blocked_s"] == 0.0
    other = lim.acquire(cfg.models["other"], p, FakeJob(3))  # same provider, other model
    assert not other.deferred and other.waited_s < 1.0
    blocked = lim.acquire(m, p, FakeJob(4))
    assert blocked.deferred and blocked.reason == "blocked"


def test_put_back_keeps_the_attempt_number(tmp_path: Path) -> None:
    from batchroute.ingest import ingest_file
    from batchroute.store import QUEUED, Store

    cfg = _config()
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"custom_id": "a", "body": {
        "messages": [{"role": "user", "content": "hi"}]}}) + "\n")
    store = Store()
    res = ingest_file(cfg, store, None, batch)
    (job_id, attempt, _), = store.queued_jobs(res.batch_id)
    assert store.claim(job_id, attempt) is not None
    assert store.put_back(job_id, attempt)
    job = store.get_job(job_id)
    assert job is not None and (job.state, job.attempt_no) == (QUEUED, attempt)
    assert not store.put_back(job_id, attempt)  # not running any more: no second message


# ---- Redis ------------------------------------------------------------------------------------

def _redis_scope(window: float = 2.0) -> Scope:
    return build_scope("mp", "batchroute:rl:{mp}", window, 20, 300, None, safety_s=0.0,
                       token_burst_fraction=0.1)


def _hammer(seed: int, until: float, out: Any) -> None:
    import redis

    be = RedisBackend(redis.Redis.from_url(REDIS_URL))
    scope, rng = _redis_scope(), random.Random(seed)
    got: list[Any] = []
    while time.time() < until:
        cost = rng.randint(5, 30)
        holder = f"h{seed}-{len(got)}-{rng.random()}"  # one per acquisition, as Limiter's
        o = be.acquire([scope], Request(cost, holder, 10.0, horizon_s=0.5))
        if o.kind == GRANTED:
            got.append((o.now + o.wait_s, cost))
            time.sleep(o.wait_s)
        else:
            time.sleep(min(o.wait_s, 0.3))
    out.put(got)


@pytest.mark.integration
def test_processes_sharing_redis_never_exceed_the_limit_in_any_window(redis_url: str) -> None:
    """Four processes acquire as fast as they can; the slots they were given (on the Redis
    clock) never hold more than rpm requests or tpm tokens in any window."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    until = time.time() + 4.5
    procs = [ctx.Process(target=_hammer, args=(i, until, out)) for i in range(4)]
    for p in procs:
        p.start()
    got = [e for _ in procs for e in out.get(timeout=30)]
    for p in procs:
        p.join(10)
    scope = _redis_scope()
    assert _max_in_window([(t, 1) for t, _ in got], scope.window_s) <= 20
    assert _max_in_window(got, scope.window_s) <= 300
    span = max(t for t, _ in got) - min(t for t, _ in got)
    assert scope.rpm is not None and scope.tpm is not None
    windows = span / scope.window_s
    capacity = min(windows * scope.rpm.limit,
                   windows * scope.tpm.limit / (sum(c for _, c in got) / len(got)))
    assert len(got) >= 0.9 * capacity  # and the allowance is used, not wasted


@pytest.mark.integration
def test_redis_reservation_is_reconciled(redis_url: str) -> None:
    import redis

    be = RedisBackend(redis.Redis.from_url(redis_url))
    s = [build_scope("r", "batchroute:rl:{r}", 60.0, None, 20, None, safety_s=0.0)]
    assert be.acquire(s, Request(10, "a", 10.0)).kind == GRANTED
    assert be.acquire(s, Request(10, "b", 10.0)).kind == GRANTED  # the window is full
    o = be.acquire(s, Request(8, "c", 10.0, horizon_s=0.1))
    assert o.kind == DEFER and o.wait_s == pytest.approx(60.0, abs=0.1)  # when "a" leaves
    be.settle(s, "a", -8, 0.0, [False], 0.0)  # "a" really used 2: refund 8
    assert be.acquire(s, Request(8, "c", 10.0, horizon_s=0.1)).kind == GRANTED
    assert be.usage(s[0])["tokens"] == 2 + 10 + 8


def _hold_slot(ready: Any) -> None:
    import redis

    be = RedisBackend(redis.Redis.from_url(REDIS_URL))
    s = [build_scope("c", "batchroute:rl:{c}", 60.0, None, None, 1)]
    assert be.acquire(s, Request(1, "doomed", lease_s=1.0)).kind == GRANTED
    ready.set()
    time.sleep(60)  # "calling the provider" until killed


@pytest.mark.integration
def test_a_killed_holders_slot_comes_back_after_its_lease(redis_url: str) -> None:
    import redis

    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_slot, args=(ready,))
    holder.start()
    assert ready.wait(10)
    os.kill(holder.pid, signal.SIGKILL)  # type: ignore[arg-type]
    holder.join(5)
    be = RedisBackend(redis.Redis.from_url(redis_url))
    s = [build_scope("c", "batchroute:rl:{c}", 60.0, None, None, 1)]
    assert be.acquire(s, Request(1, "next", 10.0)).kind == RETRY  # still leased
    assert be.usage(s[0])["in_flight"] == 1
    time.sleep(1.1)
    assert be.acquire(s, Request(1, "next", 10.0)).kind == GRANTED
    assert be.usage(s[0])["in_flight"] == 1


@pytest.mark.integration
def test_redis_and_memory_backends_decide_alike(redis_url: str) -> None:
    import redis

    scopes = [build_scope("a", "batchroute:rl:{a}", 60.0, 600, 200, 3, safety_s=0.2),
              build_scope("a/m", "batchroute:rl:{a}:model:m", 60.0, 240, None, None)]
    reqs = [Request(c, f"h{i}", 10.0) for i, c in enumerate([40, 10, 90, 5, 80])]
    reqs += [Request(20, "q1", 10.0, defer_only=True), Request(7, "q2", 10.0, defer_only=True)]
    mem_be, red_be = MemoryBackend(Clock()), RedisBackend(redis.Redis.from_url(redis_url))
    seen = []
    for r in reqs:
        a, b = mem_be.acquire(scopes, r), red_be.acquire(scopes, r)
        assert (a.kind, a.reason, a.capped) == (b.kind, b.reason, b.capped)
        assert a.wait_s == pytest.approx(b.wait_s, abs=0.05)
        seen.append((a.kind, round(a.wait_s, 2)))
    # the window's tokens at once, concurrency full, then turns: when the window could
    # free up (60 s, if the calls in flight settled now), the next behind it in the
    # concurrency shadow (a slot per hold / 3)
    assert seen == [(GRANTED, 0.0), (GRANTED, 0.0), (GRANTED, 0.0), (RETRY, 0.33),
                    (DEFER, 60.0), (DEFER, 60.33), (DEFER, 60.67)]


@pytest.mark.integration
def test_status_shows_each_pools_use_against_its_limits(redis_url: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    from batchroute.cli import main
    from batchroute.ingest import ingest_file
    from batchroute.store import Store

    cfg_path = tmp_path / "limits.toml"
    cfg_path.write_text("""
[providers.p]
base_url = "sim://"
rpm = 1000
tpm = 5000
max_concurrency = 4
[models.m]
provider = "p"
tier = 1
price = { input_per_mtok = 1, output_per_mtok = 1 }
rpm = 500
""")
    monkeypatch.setenv("BATCHROUTE_CONFIG", str(cfg_path))
    cfg = parse_config(__import__("tomllib").loads(cfg_path.read_text()))
    lim = Limiter(cfg, RedisBackend(redis.Redis.from_url(redis_url)))
    for i in range(3):
        lim.acquire(cfg.models["m"], cfg.providers["p"], FakeJob(i, prompt=10, max_tokens=10))
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"custom_id": "a", "body": {
        "messages": [{"role": "user", "content": "hi"}]}}) + "\n")
    batch_id = ingest_file(cfg, Store(), None, batch).batch_id
    res = CliRunner().invoke(main, ["status", batch_id, "--json"])
    assert res.exit_code == 0, res.output
    pools = {p["pool"]: p for p in json.loads(res.stdout)["pools"]}
    assert pools["p"]["requests"] == 3 and pools["p"]["rpm"] == 1000
    assert pools["p"]["tokens"] == 60 and pools["p"]["tokens_pct"] == 1.2
    assert pools["p"]["in_flight"] == 3 and pools["p"]["max_concurrency"] == 4
    assert pools["p/m"]["requests"] == 3 and pools["p/m"]["rpm"] == 500
    table = CliRunner().invoke(main, ["status", batch_id])
    assert table.exit_code == 0 and "rate-limit pools" in table.stdout


# ---- end to end -------------------------------------------------------------------------------

def _batch_file(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"r{i}", "body": {
                "max_tokens": 8, "messages": [{"role": "user", "content": f"Say hi {i}."}]}})
                + "\n")
    return path


def test_embedded_run_stays_under_a_strict_simulators_limits(tmp_path: Path) -> None:
    """In one process (memory backend) against the in-process sim: no 429s."""
    from batchroute.embedded import run_file

    # Our window is the simulator's 1 s, no margin: each call counts until its reply, so
    # no stall of a CPU-starved box can make it reach the simulator later than we assume.
    # Without the limiter 25 requests would go at once and 15 be refused.
    cfg = parse_config(_toml(provider="rpm = 10\nrate_window_s = 1.0",
                             simulator="rpm = 10\nwindow_s = 1.0\n[simulator.default]\n"
                                       "fail_rate = 0.0\nlatency_ms = 20"))
    started = time.monotonic()
    outcome = run_file(_batch_file(tmp_path / "b.jsonl", 25), tmp_path / "out.jsonl",
                       config=cfg, concurrency=16)
    assert outcome.report["succeeded"] == 25
    assert outcome.report["attempts"] == 25  # no 429 became an error attempt
    assert time.monotonic() - started >= 2.0  # 25 requests span >= 3 windows of 1 s


@pytest.mark.integration
def test_celery_workers_share_one_limit_against_a_strict_sim(start_worker: Any, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            ) -> None:
    """Two real worker processes, one tight limit: per-worker limits would send twice the
    rate and the strict simulator would refuse; global ones end with zero 429s."""
    from batchroute.cli import main
    from batchroute.sim import SimConfig, SimModel, SimServer
    from batchroute.store import FINISHED, Store

    window, rpm, jobs = 2.0, 8, 24
    sim = SimServer(SimConfig(rpm=rpm, window_s=window,
                              default=SimModel(latency_ms=30, fail_rate=0.0))).start()
    try:
        cfg = tmp_path / "tight.toml"
        cfg.write_text(f"""
[providers.rlpool]   # a queue no other test's workers consume
base_url = "{sim.url}/v1"
timeout_s = 10
rpm = {rpm}
tpm = 100000
# The simulator's window, no margin: a call counts until its reply (on Redis' clock),
# so CPU load delaying it on its way to the simulator's counter cannot cause a 429.
rate_window_s = {window}
[models.m]
provider = "rlpool"
tier = 1
price = {{ input_per_mtok = 1, output_per_mtok = 1 }}
[tasks.default]
ladder = [1]
validators = []
""")
        monkeypatch.setenv("BATCHROUTE_CONFIG", str(cfg))
        workers = [start_worker(concurrency=8), start_worker(concurrency=8)]
        started = time.monotonic()
        res = CliRunner().invoke(main, ["submit", str(_batch_file(tmp_path / "b.jsonl", jobs)),
                                        "--json"])
        assert res.exit_code == 0, res.output
        batch_id = json.loads(res.stdout)["batch_id"]
        store = Store()
        wait_for(lambda: sum(store.state_counts(batch_id).get(s, 0) for s in FINISHED) >= jobs,
                 60, "the batch; worker logs:\n" + "\n".join(w.log()[-2000:] for w in workers))
        elapsed = time.monotonic() - started
        stats = sim.stats()
        assert store.state_counts(batch_id) == {"succeeded": jobs}
        assert stats["by_status"].get("429", 0) == 0
        assert stats["refused_rpm"] == 0 and stats["by_status"]["200"] == jobs
        # held to the limit: a window's allowance at once, the next when it frees up
        assert elapsed >= (jobs // rpm - 1) * window
        logs = "".join(w.log() for w in workers)
        assert "rate_limited_deferred" in logs  # waits longer than ~1 s went back to the queue
    finally:
        sim.stop()


# ---- the whole allowance, strictly (sliding window) --------------------------------------------

def test_window_start_waits_for_enough_units_to_leave() -> None:
    entries = [(0.0, 40.0), (1.0, 30.0), (2.0, 30.0)]
    at = pytest.approx  # (1 us past the window's edge)
    assert window_start(entries, 100.0, 5.0, 0.0, 100, 10.0) == 5.0
    assert window_start(entries, 100.0, 5.0, 30.0, 100, 10.0) == at(10.0)  # the first 40 leave
    assert window_start(entries, 100.0, 5.0, 50.0, 100, 10.0) == at(11.0)  # and the next 30
    assert window_start(entries, 100.0, 5.0, 150.0, 100, 10.0) == at(12.0)  # oversize: empty
    assert window_start([], 0.0, 5.0, 100.0, 100, 10.0) == 5.0


def _admit_greedily(be: MemoryBackend, clock: Clock, scope: Scope, costs: list[int],
                    rng: random.Random, idle: bool = True) -> list[tuple[float, int]]:
    """Each request as early as the pool grants it (deferrals come back at their turn)."""
    out = []
    for i, c in enumerate(costs):
        while True:
            o = be.acquire([scope], Request(c, f"h{i}", 10.0, horizon_s=1.0))
            if o.kind == GRANTED:
                out.append((o.now + o.wait_s, c))
                break
            clock.sleep(max(o.wait_s, 0.001))
        if idle and rng.random() < 0.02:
            clock.sleep(rng.uniform(0, scope.window_s))  # idle now and then
    return out


@pytest.mark.parametrize(("rpm", "tpm", "window", "safety"),
                         [(10, None, 60.0, 0.0), (600, 60000, 60.0, 0.5),
                          (100, 10000, 10.0, 0.5), (None, 300, 2.0, 0.3)])
def test_pools_never_exceed_a_strict_provider_window_and_use_all_of_it(
        rpm: int | None, tpm: int | None, window: float, safety: float) -> None:
    """The simulator's own limiter counts the admitted requests, each arriving up to
    `safety` seconds late: it refuses none. And a fresh window is spent at once."""
    from batchroute.sim.limits import Limit, RateLimiter

    rng = random.Random(7)
    clock = Clock()
    scope = build_scope("p", "k", window, rpm, tpm, None, safety_s=safety)
    costs = [rng.randint(20, 200) for _ in range(3000)]
    admitted = _admit_greedily(MemoryBackend(clock), clock, scope, costs, rng)
    arrivals = sorted((t + rng.uniform(0, safety), c) for t, c in admitted)
    now = [0.0]
    provider = RateLimiter(window_s=window, clock=lambda: now[0])
    for t, c in arrivals:
        now[0] = t
        assert provider.acquire([Limit("*", rpm, tpm)], c).allowed


def test_a_fresh_window_is_spent_at_once_then_paced_as_it_frees_up() -> None:
    clock = Clock()
    scope = build_scope("p", "k", 60.0, 10, 1000, None, safety_s=0.5)
    admitted = _admit_greedily(MemoryBackend(clock), clock, scope, [50] * 25,
                               random.Random(1), idle=False)
    starts = [round(t - 1000.0, 3) for t, _ in admitted]
    assert starts == [0.0] * 10 + [60.5] * 10 + [121.0] * 5  # rpm binds: 10 a window


def test_later_arrivals_than_the_margin_are_what_a_strict_provider_refuses() -> None:
    """What made the Celery rate-limit test flaky: requests reaching the provider later
    than the safety margin after their admission can share a window with requests
    admitted a window later. The pool is strict within its margin, not beyond it."""
    from batchroute.sim.limits import Limit, RateLimiter

    clock = Clock()
    scope = build_scope("p", "k", 2.0, 8, None, None, safety_s=0.5)
    admitted = _admit_greedily(MemoryBackend(clock), clock, scope, [1] * 24,
                               random.Random(1), idle=False)
    now = [0.0]
    provider = RateLimiter(window_s=2.0, clock=lambda: now[0])
    late = [(t + (0.8 if i == 7 else 0.0), c) for i, (t, c) in enumerate(admitted)]
    refused = 0
    for t, c in sorted(late):
        now[0] = t
        refused += not provider.acquire([Limit("*", 8, None)], c).allowed
    assert refused >= 1


def test_a_job_back_before_the_window_had_room_rejoins_instead_of_queueing_last() -> None:
    clock = Clock()
    be = MemoryBackend(clock)
    s = [build_scope("p", "k", 10.0, 2, None, None, safety_s=0.0)]
    for i in range(2):
        assert be.acquire(s, Request(1, f"g{i}", 10.0)).kind == GRANTED
    turns = [be.acquire(s, Request(1, f"d{i}", 10.0, job_key=f"j{i}:1")).wait_s
             for i in range(6)]
    assert [round(t, 3) for t in turns] == [10.0, 10.0, 15.0, 20.0, 25.0, 30.0]
    clock.sleep(15.0)  # j2 returns at its turn; the window (2 at 10 s) has no room till 20
    for i in range(2):
        assert be.acquire(s, Request(1, f"r{i}", 10.0, job_key=f"j{i}:1")).kind == GRANTED
    again = be.acquire(s, Request(1, "x", 10.0, horizon_s=0.5, job_key="j2:1"))
    assert again.kind == DEFER and round(again.wait_s, 3) == 10.0  # at the window's start,
    # not behind j5's turn at 30 s
