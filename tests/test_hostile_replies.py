"""A hostile provider (tests/hostile_server.py): every way a reply can be broken, big, slow
or lying about its usage, run end to end through `batchroute run` on SQLite and PostgreSQL.

One job per behaviour, each pinned to a model whose provider is that behaviour, in one
file run once per store (module fixture). Each case then checks its own outcome: the
named error kind on the attempt with its cause, the job ended exactly once (one line in
the output or the errors file), the cost never negative and never above the stated
factor of the call's reservation, and `run` exiting 0.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batchroute import policy
from batchroute.billing import COST_CLAMP_FACTOR
from batchroute.cli import main
from batchroute.config import parse_config
from batchroute.dispatch import MAX_DELAY_S, LocalDispatcher, bounded_delay
from batchroute.embedded import run_file
from batchroute.store import FINISHED, Store, get_engine
from tests.conftest import PG_ADMIN_URL, _pg_admin, _pg_unreachable, wait_for
from tests.hostile_server import BEHAVIOURS, HostileServer

PRICE_IN, PRICE_OUT = 1.0, 2.0  # USD per million tokens
MAX_TOKENS = 20
TIMEOUT_S = 1.0  # each read; the trickles send a byte every 0.5 s, so it never fires
DEADLINE_FACTOR = 2.0  # the whole call: 2 s
RETRY_CAP_S = 0.5  # MAX_RETRY_WAIT_S for this run (300 s in production)
# MAX_ATTEMPTS_PER_JOB for the in-process run (12 in production): an error on the only
# model is retried up to the cap either way, and the trickles' 2 s per attempt made the
# corpus wait ~30 s for the twelfth.
ATTEMPTS_CAP = 4

OK, SUSPECT, CLAMPED = "ok", "usage_suspect", "cost_clamped"
MALFORMED, TOO_LARGE, DEADLINE = "malformed_reply", "reply_too_large", "deadline_exceeded"

# behaviour -> (what the job ends as, the first attempt's error kind or flags)
EXPECTED: dict[str, tuple[str, str | None]] = {
    "ok": ("succeeded", None),
    "usage-negative": ("succeeded", SUSPECT),
    "usage-2p40": ("succeeded", SUSPECT),
    "usage-2p31": ("succeeded", SUSPECT),
    "usage-float": ("succeeded", SUSPECT),
    "usage-string": ("succeeded", SUSPECT),
    "usage-bool": ("succeeded", SUSPECT),
    "usage-implausible": ("succeeded", SUSPECT),
    "usage-missing": ("succeeded", SUSPECT),
    "usage-cached-junk": ("succeeded", SUSPECT),
    "usage-over-reservation": ("succeeded", CLAMPED),
    "usage-not-object": ("failed", MALFORMED),
    "invalid-utf8": ("failed", MALFORMED),
    "message-string": ("failed", MALFORMED),
    "content-number": ("failed", MALFORMED),
    "content-object": ("failed", MALFORMED),
    "logprobs-junk": ("failed", MALFORMED),
    "logprobs-not-object": ("failed", MALFORMED),
    "choices-missing": ("failed", MALFORMED),
    "choices-empty": ("failed", MALFORMED),
    "choices-not-list": ("failed", MALFORMED),
    "choice-not-object": ("failed", MALFORMED),
    "body-array": ("failed", MALFORMED),
    "html-200": ("failed", MALFORMED),
    "empty-200": ("failed", MALFORMED),
    "truncated-json": ("failed", MALFORMED),
    "nan-usage": ("failed", MALFORMED),
    "wrong-content-type": ("succeeded", None),  # the body is what counts, not the label
    "deep-nested": ("failed", MALFORMED),
    "nested-100": ("failed", MALFORMED),
    "big-declared": ("failed", TOO_LARGE),
    "big-chunked": ("failed", TOO_LARGE),
    "big-valid": ("failed", TOO_LARGE),
    "gzip-bomb": ("failed", TOO_LARGE),
    "gzip-corrupt": ("failed", MALFORMED),
    "gzip-ok": ("succeeded", None),
    "trickle-body": ("failed", DEADLINE),
    "trickle-headers": ("failed", DEADLINE),
    "error-500-invalid-utf8": ("failed", "overloaded"),
    "error-400-error-string": ("failed", "invalid_request"),
    "retry-after-huge": ("succeeded", "rate_limited"),
    "retry-after-inf": ("succeeded", "rate_limited"),
    "retry-after-nan": ("succeeded", "rate_limited"),
    "retry-after-negative": ("succeeded", "rate_limited"),
    "retry-after-garbage": ("succeeded", "rate_limited"),
    "retry-after-1e308": ("succeeded", "rate_limited"),
    "anth-ok": ("succeeded", None),
    "anth-usage-negative": ("succeeded", SUSPECT),
    "anth-usage-huge": ("succeeded", SUSPECT),
    "anth-content-string": ("failed", MALFORMED),
    "anth-text-not-string": ("failed", MALFORMED),
    "anth-invalid-utf8": ("failed", MALFORMED),
}
assert set(EXPECTED) == set(BEHAVIOURS)


def _config_toml(url: str, cases: Any = BEHAVIOURS, prefix: str = "m") -> str:
    """A provider and a model (`{prefix}-{case}`) per behaviour."""
    out = []
    for case in cases:
        retries = 1 if case.startswith("retry-after") else 0
        kind = "anthropic" if case.startswith("anth-") else "openai"
        out.append(f'[providers.p{prefix}-{case}]\nkind = "{kind}"\n'
                   f'base_url = "{url}/{case}/v1"\n'
                   f"timeout_s = {TIMEOUT_S}\ndeadline_factor = {DEADLINE_FACTOR}\n"
                   f"max_retries = {retries}\n")
        out.append(f'[models.{prefix}-{case}]\nprovider = "p{prefix}-{case}"\ntier = 1\n'
                   f"price = {{ input_per_mtok = {PRICE_IN}, output_per_mtok = {PRICE_OUT} }}\n")
    out.append("[tasks.default]\nladder = [1]\nvalidators = []\n")
    out.append("[breaker]\nfailures = 1000\n")
    return "\n".join(out)


def _line(case: str, pin: bool = True, model: str | None = None) -> str:
    line: dict[str, Any] = {
        "custom_id": case, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "auto", "max_tokens": MAX_TOKENS,
                 "messages": [{"role": "user", "content": "Say hello."}]}}
    if pin:
        line["batchroute"] = {"pin": model or f"m-{case}"}
    return json.dumps(line)


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileServer]:
    with HostileServer() as server:
        yield server


def _database(kind: str, tmp: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'hostile.db'}"
        return
    problem = _pg_unreachable()
    if problem:
        pytest.skip(problem)
    from sqlalchemy.engine import make_url

    from batchroute import store as store_module

    name = f"batchroute_hostile_{os.getpid()}"
    _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _pg_admin(f'CREATE DATABASE "{name}"')
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with store_module._engines_lock:
            engines = [store_module._engines.pop(k) for k in list(store_module._engines)
                       if k.split("#")[0].endswith(f"/{name}")]
        for engine in engines:
            engine.dispose()
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def corpus(request: pytest.FixtureRequest, hostile: HostileServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`batchroute run` over one job per behaviour, on one store; what it left behind."""
    only = os.environ.get("BATCHROUTE_TEST_DATABASE", "").strip().lower()
    if only and not request.param.startswith(only[:6]):
        pytest.skip(f"BATCHROUTE_TEST_DATABASE={only}")
    tmp = tmp_path_factory.mktemp(f"hostile-{request.param}")
    hostile.reset()
    for url in _database(request.param, tmp):
        cfg = tmp / "hostile.toml"
        cfg.write_text(_config_toml(hostile.url))
        src = tmp / "in.jsonl"
        src.write_text("\n".join(_line(c) for c in BEHAVIOURS) + "\n")
        out, err = tmp / "out.jsonl", tmp / "err.jsonl"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(policy, "MAX_RETRY_WAIT_S", RETRY_CAP_S)
            mp.setattr(policy, "MAX_ATTEMPTS_PER_JOB", ATTEMPTS_CAP)
            started = time.monotonic()
            res = CliRunner().invoke(
                main, ["--config", str(cfg), "run", str(src), "-o", str(out), "--errors",
                       str(err), "--json"],
                env={"BATCHROUTE_DATABASE_URL": url, "BATCHROUTE_CONFIG": str(cfg)})
            elapsed = time.monotonic() - started
        store = Store(get_engine(url))
        with store.session() as s:
            from sqlmodel import select

            from batchroute.store import Batch
            batch = s.exec(select(Batch)).first()
        lines = [json.loads(x) for p in (out, err) if p.exists()
                 for x in p.read_text().splitlines()]
        yield {"res": res, "elapsed": elapsed, "store": store, "lines": lines,
               "batch_id": batch.id if batch else None, "url": url}


def _job(corpus: dict[str, Any], case: str) -> tuple[Any, list[Any]]:
    store: Store = corpus["store"]
    jobs = {j.custom_id: j for j in store.iter_jobs(corpus["batch_id"])}
    job = jobs[case]
    return job, store.job_attempts(job.id)


def test_run_exits_0_in_bounded_time(corpus: dict[str, Any]) -> None:
    res = corpus["res"]
    assert res.exit_code == 0, (res.output, res.exception)
    # Trickles are cut at 2 s, a Retry-After waits at most RETRY_CAP_S, and an error on the
    # only model is retried with a short backoff (at most 2 s) up to the attempt cap: nothing
    # waits for a provider's 31 years, nor for minutes.
    assert corpus["elapsed"] < 90, corpus["elapsed"]
    assert len(EXPECTED) >= 25


@pytest.mark.parametrize("case", list(EXPECTED))
def test_hostile_reply_outcome(corpus: dict[str, Any], case: str) -> None:
    state, detail = EXPECTED[case]
    job, attempts = _job(corpus, case)
    assert job.state == state, (job.state, job.error, [(a.error_kind, a.reason)
                                                       for a in attempts])
    assert job.state in FINISHED
    # Ended exactly once: one line for it in the output or the errors file.
    mine = [x for x in corpus["lines"] if x["custom_id"] == case]
    assert len(mine) == 1, mine
    assert attempts, "no attempt recorded"
    assert len(attempts) <= ATTEMPTS_CAP, [(a.error_kind, a.reason) for a in attempts]
    first = attempts[0]
    if detail in (SUSPECT, CLAMPED):
        assert first.flags is not None and detail in first.flags.split(",")
    elif detail is None:
        assert first.flags is None and first.outcome == "ok"
    else:
        assert first.outcome == "error" and first.error_kind == detail, (
            first.error_kind, first.reason)
        assert first.reason  # the cause is on the attempt, not lost with a worker
    if state == "failed":
        # OpenAI's format: no response, or the provider's own HTTP answer (bounded, a dict)
        response = mine[0]["response"]
        assert response is None or (isinstance(response["status_code"], int)
                                    and len(str(response["body"])) <= 8192)
        assert mine[0]["error"]["code"]
        assert job.error and job.error["message"]
    if case.startswith("retry-after"):
        assert [a.outcome for a in attempts] == ["error", "ok"]
    for a in attempts:  # costs: never negative, never past the reservation's factor
        assert a.cost_usd >= 0 and math.isfinite(a.cost_usd)
        reserved = (64 * PRICE_IN + MAX_TOKENS * PRICE_OUT) / 1e6  # the prompt is < 64
        assert a.cost_usd <= COST_CLAMP_FACTOR * reserved + 1e-12, (a.cost_usd, reserved)
        assert 0 <= a.prompt_tokens < 2**31 and 0 <= a.completion_tokens < 2**31


def test_suspect_usage_is_billed_on_our_own_count(corpus: dict[str, Any]) -> None:
    """tiktoken's count of the prompt and of 'Hello there.' (3 tokens), not the reply's."""
    for case in ("usage-negative", "usage-2p40", "usage-float", "anth-usage-huge"):
        _, attempts = _job(corpus, case)
        a = attempts[0]
        assert a.completion_tokens == 3 and 0 < a.prompt_tokens < 64, (case, a)
        assert a.cost_usd == pytest.approx((a.prompt_tokens * PRICE_IN + 3 * PRICE_OUT) / 1e6)


def test_clamped_cost_is_the_factor_of_the_reservation(corpus: dict[str, Any]) -> None:
    job, attempts = _job(corpus, "usage-over-reservation")
    reserved = (job.prompt_tokens_est * PRICE_IN + MAX_TOKENS * PRICE_OUT) / 1e6
    assert attempts[0].cost_usd == pytest.approx(COST_CLAMP_FACTOR * reserved)


def test_ledger_total_is_never_negative(corpus: dict[str, Any]) -> None:
    store: Store = corpus["store"]
    spent = store.spent_usd(corpus["batch_id"])
    ok = [a for a in store.attempts(corpus["batch_id"]) if a.outcome == "ok"]
    assert spent > 0 and spent == pytest.approx(sum(a.cost_usd for a in ok))


# ---- the consumers of a Retry-After survive any number ------------------------------------
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, -5.0, 1e9, 1e308, "x", None,
                                   True])
def test_backoff_is_bounded_for_any_retry_after(value: Any) -> None:
    delay = policy.backoff(1, value)
    assert math.isfinite(delay) and 0 <= delay <= policy.MAX_RETRY_WAIT_S
    assert bounded_delay(value) <= MAX_DELAY_S


def test_retry_timer_survives_inf_and_nan_delays() -> None:
    """`Retry-After: inf` once killed the timer thread: every later delayed job stalled."""
    ran: list[str] = []
    d = LocalDispatcher(handler=lambda job, n: ran.append(job), concurrency=2)
    try:
        d.enqueue("inf", 1, "q", math.inf)
        d.enqueue("nan", 1, "q", math.nan)  # nan: no wait at all
        d.enqueue("neg", 1, "q", -3)
        d.enqueue("later", 1, "q", 0.1)
        deadline = time.monotonic() + 5
        while "later" not in ran and time.monotonic() < deadline:
            time.sleep(0.02)
        assert {"nan", "neg", "later"} <= set(ran)
        assert "inf" not in ran  # held for MAX_DELAY_S, not forever, and not run early
    finally:
        d.close()


def test_negative_usage_cannot_let_a_batch_overspend(hostile: HostileServer,
                                                     tmp_path: Path) -> None:
    """Negative counts once became negative costs, and a batch spent 2.5x its budget."""
    config = parse_config({
        "providers": {"p": {"base_url": f"{hostile.url}/usage-negative/v1", "max_retries": 0,
                            "timeout_s": 5}},
        "models": {"m": {"provider": "p", "tier": 1,
                         "price": {"input_per_mtok": PRICE_IN, "output_per_mtok": PRICE_OUT}}},
        "tasks": {"default": {"ladder": [1], "validators": []}}})
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(_line(f"j{i}", pin=False) for i in range(20)) + "\n")
    budget = 1e-4  # about six of these calls
    store = Store()
    outcome = run_file(src, tmp_path / "out.jsonl", tmp_path / "err.jsonl", config,
                       store=store, concurrency=4, budget_usd=budget)
    batch_id = outcome.ingest.batch_id
    assert 0 < outcome.report["succeeded"] < 20
    assert store.spent_usd(batch_id) <= budget + 1e-12
    codes = {j.error["code"] for j in store.iter_jobs(batch_id) if j.error}
    assert codes == {"budget_exhausted"}


CELERY_CASES = ("ok", "usage-negative", "usage-2p40", "invalid-utf8", "message-string",
                "logprobs-junk", "trickle-body", "gzip-bomb")


@pytest.mark.integration
def test_celery_workers_record_the_cause_of_every_hostile_reply(
        hostile: HostileServer, start_worker: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On real workers these replies once crashed the task (a count past 2^31 failed the
    PostgreSQL write): jobs ended `worker_lost` after three leases, the cause unrecorded.
    Now each ends once, its attempt naming the error kind, and nothing is lost."""
    cfg = tmp_path / "hostile.toml"
    cfg.write_text(_config_toml(hostile.url, CELERY_CASES, prefix="hc"))
    monkeypatch.setenv("BATCHROUTE_CONFIG", str(cfg))
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(_line(c, model=f"hc-{c}") for c in CELERY_CASES) + "\n")
    worker = start_worker(concurrency=8)
    res = CliRunner().invoke(main, ["submit", str(src), "--json"])
    assert res.exit_code == 0, res.output
    batch_id = json.loads(res.stdout)["batch_id"]
    store = Store()
    wait_for(lambda: sum(store.state_counts(batch_id).get(s, 0) for s in FINISHED)
             >= len(CELERY_CASES), 120, "the batch; worker log:\n" + worker.log()[-3000:])
    jobs = {j.custom_id: j for j in store.iter_jobs(batch_id)}
    for case in CELERY_CASES:
        state, detail = EXPECTED[case]
        attempts = store.job_attempts(jobs[case].id)
        assert jobs[case].state == state, (case, jobs[case].error)
        # An error on the only model is waited out (#14): retried, never more than the
        # per-job attempt cap, each attempt naming the same kind.
        outcomes = {a.outcome for a in attempts}
        assert outcomes in ({"ok"}, {"error"}) and len(attempts) <= policy.MAX_ATTEMPTS_PER_JOB, (
            case, attempts)
        assert len(attempts) == 1 or outcomes == {"error"}
        a = attempts[0]
        assert a.error_kind == detail or (a.flags or "") == (detail or ""), (case, a)
        assert a.cost_usd >= 0
