"""Provider batch mode (#18): jobs of pools marked `batch = true` go through the simulated
OpenAI Files + Batches and Anthropic Message Batches APIs, over HTTP, and end exactly once.

The pure rules (which call goes to a batch, when a group goes out, where an unanswered
request goes) are tested without servers; the rest runs the real embedded pipeline or
the tick against the simulator, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
from click.testing import CliRunner

from batchroute.cli import main
from batchroute.config import ConfigError, parse_config
from batchroute.dispatch import LocalDispatcher
from batchroute.embedded import run_file
from batchroute.ingest import ingest_file
from batchroute.provider_batch import runner
from batchroute.provider_batch.client import OpenAIBatchClient
from batchroute.provider_batch.plan import (
    REGATHER,
    SYNC,
    Limits,
    after_unanswered,
    ready_groups,
    wants_batch_api,
)
from batchroute.provider_batch.pricing import BATCH_FLAG
from batchroute.recovery import cancel_batch
from batchroute.runtime import Runtime
from batchroute.sim import SimConfig, SimServer
from batchroute.store import BATCHED, FINISHED, ProviderBatch, Store, get_engine, utcnow
from batchroute.store import provider_batches as spb

from .conftest import wait_for
from .dedicated_redis import own_broker
from .test_provider_batch import ended_batches

__all__ = ["own_broker"]  # the fixture, imported for use here


# ---- the pure rules ------------------------------------------------------------------------
def test_a_call_goes_to_a_provider_batch_only_when_pool_batch_and_deadline_allow() -> None:
    now, later = 100.0, 200.0
    assert wants_batch_api(True, None, {}, now, later)
    assert wants_batch_api(True, True, {}, now, later)
    assert not wants_batch_api(False, True, {}, now, later)  # pool not marked batch
    assert not wants_batch_api(True, False, {}, now, later)  # --no-provider-batch
    assert not wants_batch_api(True, None, {"sync": True}, now, later)  # sent synchronous
    assert not wants_batch_api(True, None, {}, later, now)  # past the deadline


class W:
    def __init__(self, batch: str, model: str, age_s: float, tokens: int = 10,
                 provider: str = "p") -> None:
        self.batch_id, self.provider, self.model = batch, provider, model
        self.prompt_tokens = tokens
        self.since = datetime(2026, 1, 1, tzinfo=UTC) - timedelta(seconds=age_s)


NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_groups_wait_for_more_jobs_until_full_old_or_their_batch_is_quiet() -> None:
    limits = {"p": Limits(max_requests=3)}
    young = [W("b", "m", 1) for _ in range(2)]
    # Young, not full, batch still busy: wait for more.
    assert ready_groups(young, NOW, 60, busy={"b"}, limits=limits) == []
    # Batch quiet (nothing else running): go now.
    assert [len(g) for g in ready_groups(young, NOW, 60, busy=set(), limits=limits)] == [2]
    # Oldest waited gather_s: go now.
    old = young + [W("b", "m", 61)]
    assert [len(g) for g in ready_groups(old, NOW, 60, busy={"b"}, limits=limits)] == [3]
    # Full: the full chunks go, the young remainder waits.
    many = [W("b", "m", 1) for _ in range(7)]
    assert [len(g) for g in ready_groups(many, NOW, 60, busy={"b"}, limits=limits)] == [3, 3]


def test_groups_never_mix_batches_models_and_respect_a_token_limit() -> None:
    jobs = [W("b1", "m1", 99), W("b1", "m2", 99), W("b2", "m1", 99), W("b1", "m1", 99)]
    groups = ready_groups(jobs, NOW, 60, busy=set(), limits={"p": Limits(100)})
    assert sorted(len(g) for g in groups) == [1, 1, 2]
    assert all(len({(j.batch_id, j.model) for j in g}) == 1 for g in groups)
    heavy = [W("b", "m", 99, tokens=400) for _ in range(5)]
    groups = ready_groups(heavy, NOW, 60, busy=set(),
                          limits={"p": Limits(100, max_tokens=1000)})
    assert [len(g) for g in groups] == [2, 2, 1]


def test_api_limits_cap_the_configured_request_limit() -> None:
    assert Limits.of("openai", None, None).max_requests == 50_000
    assert Limits.of("anthropic", 10**9, None).max_requests == 100_000
    assert Limits.of("openai", 500, 7).max_requests == 500


def test_an_unanswered_request_goes_to_the_next_batch_then_synchronously() -> None:
    assert after_unanswered(0, 1, now=1.0, deadline=10.0) == REGATHER
    assert after_unanswered(1, 1, now=1.0, deadline=10.0) == SYNC  # expired once already
    assert after_unanswered(0, 1, now=11.0, deadline=10.0) == SYNC  # past the deadline
    assert after_unanswered(0, 0, now=1.0, deadline=10.0) == SYNC  # max_expiries 0


def test_config_reads_batch_settings_and_names_bad_values() -> None:
    data = _config_dict("http://x/v1")
    config = parse_config(data)
    assert config.uses_batch_api(config.models["sim-small"])
    assert config.provider_batch.gather_s == 0.3
    data["models"]["sim-large"]["batch"] = False
    assert not parse_config(data).uses_batch_api(parse_config(data).models["sim-large"])
    for path, value, needle in (
            (("providers", "sim", "batch_discount"), 1.5, "providers.sim.batch_discount"),
            (("providers", "sim", "batch"), "yes", "providers.sim.batch"),
            (("provider_batch", "poll_s"), 0, "provider_batch.poll_s"),
            (("provider_batch", "max_requests"), 2.5, "provider_batch.max_requests"),
            (("provider_batch", "polls"), 1, "provider_batch.polls")):
        bad = _config_dict("http://x/v1")
        target = bad[path[0]][path[1]] if len(path) == 3 else bad[path[0]]
        target[path[-1]] = value
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            parse_config(bad)


# ---- real runs against the simulator --------------------------------------------------------
def _config_dict(base_url: str, kind: str = "openai", delay_s: float = 0.3,
                 **sim_batch: Any) -> dict[str, Any]:
    models = {}
    for size, tier, ref in (("small", 1, "gpt-4o-mini"), ("medium", 2, "gpt-4.1-mini"),
                            ("large", 3, "gpt-4o")):
        models[f"sim-{size}"] = {"provider": "sim", "tier": tier, "price_ref": ref,
                                 "price_provider": "openai"}
    checks = [{"type": "non_empty"}, {"type": "finish_reason"}]
    return {
        "providers": {"sim": {"kind": kind, "base_url": base_url, "timeout_s": 10,
                              "batch": True}},
        "models": models,
        "tasks": {"default": {"ladder": [1, 2, 3], "validators": checks},
                  "classify": {"ladder": [1, 2, 3], "validators": checks}},
        "provider_batch": {"gather_s": 0.3, "poll_s": 0.2, "submit_timeout_s": 0.5},
        "simulator": {"seed": 7, "default": {"fail_rate": 0.1},
                      "models": {"sim-small": {"fail_rate": 0.3},
                                 "sim-medium": {"fail_rate": 0.1},
                                 "sim-large": {"fail_rate": 0.02}},
                      "batch": {"delay_s": delay_s, **sim_batch}},
    }


def make_batch(path: Path, n: int) -> Path:
    topics = ["a late delivery", "a broken hinge", "a double charge", "a password reset"]
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({
                "custom_id": f"job-{i:05d}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "auto", "max_tokens": 5, "temperature": 0.7, "messages": [
                    {"role": "user", "content": f"Ticket {i} is about {topics[i % 4]}. Is it "
                                                "a complaint? Answer with one of: yes, no."}]},
                "batchroute": {"task": "classify", "validators": [
                    {"type": "choices", "choices": ["yes", "no"]}]}}) + "\n")
    return path


class Sim:
    """The simulator over HTTP in this process, with the config that points at it."""

    def __init__(self, kind: str = "openai", delay_s: float = 0.3, **sim_batch: Any) -> None:
        probe = _config_dict("http://x", kind, delay_s, **sim_batch)
        self.server = SimServer(SimConfig.from_dict(probe["simulator"])).start()
        self.data = _config_dict(f"{self.server.url}/v1", kind, delay_s, **sim_batch)
        self.config = parse_config(self.data)

    def batches(self, api: str) -> list[Any]:
        return self.server.batches.all_jobs(api)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def sim() -> Any:
    made: list[Sim] = []

    def make(**kwargs: Any) -> Sim:
        s = Sim(**kwargs)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def outputs(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def exactly_once(store: Store, batch_id: str, n: int, out: Path) -> None:
    lines = outputs(out)
    assert sorted(x["custom_id"] for x in lines) == [f"job-{i:05d}" for i in range(n)]
    counts = store.state_counts(batch_id)
    assert sum(counts.get(s, 0) for s in FINISHED) == n, counts
    per_job: dict[str, list[int]] = {}
    for a in store.attempts(batch_id):
        per_job.setdefault(a.job_id, []).append(a.attempt_no)
    for job in store.iter_jobs(batch_id):
        nos = sorted(per_job.get(job.id, []))
        assert nos == list(range(1, len(nos) + 1)), f"{job.id}: attempts {nos}"


def settled(rt: Any, batch_id: str) -> bool:
    """One tick, then: the dispatcher idle and no job parked or waiting for a provider
    batch. In that order: a job the dispatcher is still concluding is neither, and may
    escalate into the next provider-batch round (parked again) after a look at pending."""
    runner.tick(rt)
    return bool(rt.dispatcher.join(timeout=0.1)) and not runner.pending(rt, batch_id)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_batch_mode_costs_half_of_the_same_routing_run_synchronously(
        sim: Any, tmp_path: Path, kind: str) -> None:
    n = 80
    s = sim(kind=kind)
    src = make_batch(tmp_path / "b.jsonl", n)
    store = Store()
    batched = run_file(src, tmp_path / "out.jsonl", config=s.config, store=store)
    exactly_once(store, batched.ingest.batch_id, n, tmp_path / "out.jsonl")
    attempts = store.attempts(batched.ingest.batch_id)
    # Every call went through the batch API (flagged, priced at the batch price).
    assert attempts and all(BATCH_FLAG in (a.flags or "") for a in attempts)
    assert len(s.batches(kind)) >= 2  # tier 1, then the escalations' round
    report = batched.report
    assert report["provider_batches"]["count"] == len(s.batches(kind))
    assert report["provider_batches"]["by_state"] == {"done": report["provider_batches"]["count"]}
    assert report["savings_by_source"]["batch_discount_usd"] == pytest.approx(
        report["cost_usd"], rel=1e-6)  # 50%: what was paid was saved once more

    # The same file, the same routing (the simulator's answers are seeded by request),
    # sent synchronously: twice the price.
    s2 = sim(kind=kind)
    store2 = Store(get_engine(f"sqlite:///{tmp_path / 'sync.db'}"))  # a store of its own
    sync = run_file(src, tmp_path / "out2.jsonl", config=s2.config, store=store2,
                    provider_batch=False)
    assert not s2.batches(kind)
    assert sync.report["succeeded"] == report["succeeded"]
    assert report["cost_usd"] == pytest.approx(0.5 * sync.report["cost_usd"], rel=1e-6)
    # Same answers, line by line.
    content = {x["custom_id"]: x["response"]["body"]["choices"][0]["message"]["content"]
               for x in outputs(tmp_path / "out.jsonl") if x.get("response")}
    content2 = {x["custom_id"]: x["response"]["body"]["choices"][0]["message"]["content"]
                for x in outputs(tmp_path / "out2.jsonl") if x.get("response")}
    assert content == content2


@pytest.mark.integration
def test_an_expired_provider_batch_sends_its_unfinished_jobs_on(sim: Any,
                                                                tmp_path: Path) -> None:
    n = 60
    s = sim(expire_fraction=0.5, expire_batches=1)
    store = Store()
    res = run_file(make_batch(tmp_path / "b.jsonl", n), tmp_path / "out.jsonl",
                   config=s.config, store=store)
    batch_id = res.ingest.batch_id
    exactly_once(store, batch_id, n, tmp_path / "out.jsonl")
    statuses = Counter(pb.remote_status for pb in spb.of_batch(store, batch_id))
    assert statuses["expired"] == 1
    first = s.batches("openai")[-1]  # listing is newest first
    assert first.ended_as == "expired" and len(first.results) < n
    # The expired requests were never billed and went into a later provider batch. (The
    # first batch holds what was gathered by then: all n jobs on a quiet machine.)
    resent = [j for j in store.iter_jobs(batch_id) if j.options.get("batch_expiries")]
    assert len(resent) == len(first.items) - len(first.results) > 0
    # Their output lines say so, with the reason.
    said = [x["batchroute"]["provider_batch"] for x in outputs(tmp_path / "out.jsonl")
            if "provider_batch" in x["batchroute"]]
    assert len(said) == len(resent)
    assert all(x["unanswered"].startswith("expired") and x["expiries"] == 1
               and not x["sent_synchronously"] for x in said)
    assert all(j.state in FINISHED for j in resent)
    assert all(BATCH_FLAG in (a.flags or "") for a in store.attempts(batch_id))


@pytest.mark.integration
def test_the_deadline_cancels_a_slow_provider_batch_and_the_rest_runs_synchronously(
        sim: Any, tmp_path: Path) -> None:
    n = 30
    s = sim(delay_s=120.0)  # the provider would take two minutes
    store = Store()
    started = time.monotonic()
    res = run_file(make_batch(tmp_path / "b.jsonl", n), tmp_path / "out.jsonl",
                   config=s.config, store=store, deadline_s=2.0)
    assert time.monotonic() - started < 60
    batch_id = res.ingest.batch_id
    exactly_once(store, batch_id, n, tmp_path / "out.jsonl")
    assert res.report["succeeded"] + res.report["failed"] == n
    pbs = spb.of_batch(store, batch_id)
    assert pbs and all(pb.remote_status == "cancelled" for pb in pbs)
    assert all(pb.note == "batch deadline reached" for pb in pbs)
    # Nothing was answered by the cancelled batch: every attempt was synchronous.
    assert not any(BATCH_FLAG in (a.flags or "") for a in store.attempts(batch_id))
    assert all(j.options.get("sync") for j in store.iter_jobs(batch_id))


# ---- the tick, step by step ---------------------------------------------------------------
@contextmanager
def ingested(s: Sim, store: Store, path: Path,
             deadline_s: float | None = None) -> Iterator[tuple[Runtime, str]]:
    """The file's jobs run once by a local pipeline (they park for provider batches), and
    the Runtime for driving the tick by hand."""
    from batchroute.pipeline import process_job

    dispatcher = LocalDispatcher(concurrency=8)
    rt = Runtime(s.config, store, dispatcher)
    dispatcher.handler = lambda job_id, attempt_no: process_job(rt, job_id, attempt_no)
    try:
        result = ingest_file(s.config, store, dispatcher, path, deadline_s=deadline_s)
        assert dispatcher.join(timeout=30)
        yield rt, result.batch_id
    finally:
        dispatcher.close()
        rt.close()


def stranded(store: Store, batch_id: str, row_id: str, since: datetime,
             api: str = "openai") -> ProviderBatch:
    """What a submitter leaves when it dies mid-submission: the row with its jobs, in
    state "submitting" since `since`, with no provider id."""
    waiting = spb.waiting(store)
    assert waiting and all(w.batch_id == batch_id for w in waiting)
    row = ProviderBatch(id=row_id, batch_id=batch_id, provider="sim", model=waiting[0].model,
                        api=api, jobs=len(waiting))
    assert spb.create(store, row, waiting) == len(waiting)
    spb.set_fields(store, row.id, state="submitting", submitting_at=since)
    return row


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_submitter_killed_after_create_is_adopted_not_sent_twice(sim: Any, tmp_path: Path,
                                                                  kind: str) -> None:
    from batchroute.pipeline import request_for
    from batchroute.provider_batch import formats
    from batchroute.provider_batch.client import AnthropicBatchClient

    s = sim(kind=kind, delay_s=0.5)
    store = Store()
    with ingested(s, store, make_batch(tmp_path / "b.jsonl", 20)) as (rt, batch_id):
        # What a submitter does up to its crash: the row, "submitting", the upload and the
        # create at the provider; then it dies before storing the provider's id.
        row = stranded(store, batch_id, "pb_crashed", utcnow(), kind)
        assert row.jobs == 20
        model = s.config.models[row.model]
        requests = [(formats.custom_id_for(j.id), model.api_model,
                     request_for(rt, j, model)[1]) for j in spb.jobs_of(store, row.id)]
        base = rt.base_url(s.config.providers["sim"])
        if kind == "openai":
            client = OpenAIBatchClient(httpx.Client(), base, None)
            remote = client.create(client.upload(formats.openai_input_file(requests)),
                                   metadata={"batchroute_id": row.id})
        else:  # no metadata in this API: found by size and time
            remote = AnthropicBatchClient(httpx.Client(), base, None).submit(
                formats.anthropic_create_body(requests))
        # A busy account: 150 batches created since, so ours is on the second list page.
        ended_batches(s.server, kind, 150, time.time() + 1)
        # The row's age is set right before each tick: building the requests and the create
        # above may take longer than submit_timeout_s on a loaded machine.
        spb.set_fields(store, row.id, submitting_at=utcnow())
        assert runner.tick(rt).adopted == 0  # within submit_timeout_s: maybe still alive
        spb.set_fields(store, row.id, submitting_at=utcnow() - timedelta(seconds=0.6))
        assert runner.tick(rt).adopted == 1
        assert spb.get(store, row.id).remote_id == remote  # type: ignore[union-attr]
        wait_for(lambda: settled(rt, batch_id), 60, "the batch to finish")
        first_round = [b for b in s.batches(kind) if len(b.items) == 20]
        assert [b.id for b in first_round] == [remote]  # never sent a second time
        counts = store.state_counts(batch_id)
        assert sum(counts.get(x, 0) for x in FINISHED) == 20, counts


@pytest.mark.integration
def test_a_submission_that_never_reached_the_provider_is_sent_again(sim: Any,
                                                                   tmp_path: Path) -> None:
    s = sim(delay_s=0.2)
    store = Store()
    with ingested(s, store, make_batch(tmp_path / "b.jsonl", 10)) as (rt, batch_id):
        row = stranded(store, batch_id, "pb_lost", utcnow() - timedelta(seconds=5))
        report = runner.tick(rt)
        assert report.adopted == 0
        assert spb.get(store, row.id).state == "building"  # type: ignore[union-attr]
        report = runner.tick(rt)
        assert report.submitted == 1 and len(s.batches("openai")) == 1


@pytest.mark.integration
def test_cancel_cancels_provider_batches_and_records_what_was_billed(sim: Any,
                                                                    tmp_path: Path) -> None:
    s = sim(delay_s=3.0)
    s.config = parse_config({**s.data, "budget": {"batch_usd": 10.0}})
    store = Store()
    with ingested(s, store, make_batch(tmp_path / "b.jsonl", 20)) as (rt, batch_id):
        (held,) = rt.budget.status(batch_id)
        assert held["reserved_usd"] > 0  # parked jobs hold their batch-price maximum
        report = runner.tick(rt)
        assert report.gathered == 1 and report.submitted == 1
        # `status` shows the provider batch the jobs wait in, with the provider's word.
        res = CliRunner().invoke(main, ["status", batch_id, "--json"])
        (open_pb,) = json.loads(res.stdout)["provider_batches"]["open"]
        assert open_pb["state"] == "submitted" and open_pb["jobs"] == 20
        assert open_pb["remote_id"].startswith("batch_")
        res = CliRunner().invoke(main, ["status", batch_id])
        assert "provider batches (1 in all)" in res.stdout and "submitted" in res.stdout
        (remote,) = s.batches("openai")
        wait_for(lambda: len(remote.results) >= 5, 10, "the provider to answer some")
        counts = cancel_batch(store, batch_id)
        assert counts["cancelled_queued"] == 20 and counts["provider_batches_cancelling"] == 1
        time.sleep(0.3)
        runner.tick(rt)
        wait_for(lambda: remote.ended_at is not None, 20, "the provider to end the batch")
        assert remote.ended_as == "cancelled"
        wait_for(lambda: (runner.tick(rt), spb.of_batch(store, batch_id)[0].state == "done")[1],
                 20, "the cancelled provider batch to be collected")
        assert store.state_counts(batch_id) == {"cancelled": 20}
        # What the provider answered before the cancel is in the ledger, answer discarded.
        discarded = [a for a in store.attempts(batch_id) if a.outcome == runner.DISCARDED]
        assert len(discarded) == len(remote.results) - sum(
            1 for r in remote.results.values() if "cancel" in json.dumps(r))
        assert discarded and all(a.cost_usd > 0 for a in discarded)
        # Every reservation settled: what was billed is spent, nothing stays reserved.
        (budget,) = rt.budget.status(batch_id)
        assert budget["reserved_usd"] == pytest.approx(0, abs=1e-12)
        assert budget["spent_usd"] == pytest.approx(sum(a.cost_usd for a in discarded))
        # A resume runs them again at a new attempt number (no clash with those rows).
        for j in store.iter_jobs(batch_id):
            if any(a.job_id == j.id for a in discarded):
                assert j.attempt_no == 2


@pytest.mark.integration
def test_nothing_waits_in_batched_state_without_a_provider_batch_for_long(
        sim: Any, tmp_path: Path) -> None:
    """A job parked for a provider batch is gathered by the next tick once its batch is
    quiet, and the job is in state batched (no broker message) until then."""
    s = sim()
    store = Store()
    with ingested(s, store, make_batch(tmp_path / "b.jsonl", 5)) as (rt, batch_id):
        assert store.state_counts(batch_id) == {BATCHED: 5}
        assert runner.tick(rt).gathered == 1
        assert not spb.waiting(store)


# ---- Celery workers and beat, SIGKILLed with provider batches in flight --------------------
@pytest.mark.integration
def test_sigkilled_worker_and_beat_lose_nothing_in_flight(
        sim: Any, start_worker: Any, own_broker: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal
    import subprocess
    import sys

    from .conftest import ROOT
    from .test_reliability import check_exactly_once, submit

    n = 300
    s = sim(delay_s=2.0, expire_fraction=0.5, expire_batches=1)
    s.data["provider_batch"].update(max_requests=100, lease_s=2.0, poll_s=0.3)
    cfg = tmp_path / "batch.toml"
    cfg.write_text(tomli_w.dumps(s.data))
    monkeypatch.setenv("BATCHROUTE_CONFIG", str(cfg))
    env = {"BATCHROUTE_CONFIG": str(cfg), "BATCHROUTE_BROKER_URL": own_broker.url,
           "BATCHROUTE_LEASE_S": "3", "BATCHROUTE_TASK_TIME_LIMIT_S": "2",
           "BATCHROUTE_STALE_QUEUED_S": "3", "BATCHROUTE_SWEEP_INTERVAL_S": "1",
           "BATCHROUTE_PROVIDER_BATCH_TICK_S": "0.5", "BATCHROUTE_TASK_EVENTS": "0"}
    for key, value in env.items():  # `submit` below runs in this process
        monkeypatch.setenv(key, value)
    batch_id, jobs = submit(make_batch(tmp_path / "b.jsonl", n))
    store = Store()

    def beat() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers", "beat", "-l", "WARNING",
             "-s", str(tmp_path / f"beat-{time.monotonic_ns()}")],
            cwd=ROOT, env={**os.environ, **env}, stdout=(tmp_path / "beat.log").open("ab"),
            stderr=subprocess.STDOUT, start_new_session=True)

    worker = start_worker(concurrency=8, **env)
    beats = [beat()]
    try:
        # Provider batches submitted and not yet ended: kill everything.
        wait_for(lambda: sum(pb.state == "submitted" for pb in spb.of_batch(store, batch_id))
                 >= 2, 60, f"provider batches in flight; log:\n{worker.log()[-2000:]}")
        worker.kill()
        os.killpg(beats[0].pid, signal.SIGKILL)
        in_flight = [pb.id for pb in spb.of_batch(store, batch_id) if pb.state == "submitted"]
        time.sleep(3.0)  # the provider finishes them meanwhile
        worker = start_worker(concurrency=8, **env)
        beats.append(beat())
        wait_for(lambda: sum(store.state_counts(batch_id).get(x, 0) for x in FINISHED) >= n,
                 120, f"the batch to finish: {store.state_counts(batch_id)}; "
                      f"log:\n{worker.log()[-3000:]}", interval=0.5)
    finally:
        for b in beats:
            if b.poll() is None:
                os.killpg(b.pid, signal.SIGTERM)
                b.wait(timeout=15)
    check_exactly_once(store, batch_id, jobs, tmp_path)
    pbs = {pb.id: pb for pb in spb.of_batch(store, batch_id)}
    assert all(pbs[i].state == "done" for i in in_flight)  # collected after the restart
    assert Counter(pb.remote_status for pb in pbs.values())["expired"] == 1
    # Each provider batch was sent once: as many at the provider as rows that got an id.
    assert len(s.batches("openai")) == sum(1 for pb in pbs.values() if pb.remote_id)
    assert all(BATCH_FLAG in (a.flags or "") for a in store.attempts(batch_id)
               if a.outcome != "lost")


@pytest.mark.integration
def test_identical_requests_in_batch_mode_are_paid_once(sim: Any, tmp_path: Path) -> None:
    s = sim()
    src = tmp_path / "dupes.jsonl"
    line = {"method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "auto", "max_tokens": 5, "temperature": 0, "messages": [
                {"role": "user", "content": "Is a refund a complaint? Answer yes or no."}]}}
    src.write_text("".join(json.dumps({**line, "custom_id": f"job-{i:05d}"}) + "\n"
                           for i in range(8)))
    store = Store()
    res = run_file(src, tmp_path / "out.jsonl", config=s.config, store=store)
    exactly_once(store, res.ingest.batch_id, 8, tmp_path / "out.jsonl")
    sent = sum(len(b.items) for b in s.batches("openai"))
    paid = [a for a in store.attempts(res.ingest.batch_id) if a.cost_usd > 0]
    assert sent == len(paid) and len({a.job_id for a in paid}) == 1  # one job paid
    assert res.report["reuse"]["hits"] == 7


@pytest.mark.integration
def test_no_provider_batch_is_started_past_the_deadline(sim: Any, tmp_path: Path) -> None:
    s = sim()
    store = Store()
    with ingested(s, store, make_batch(tmp_path / "b.jsonl", 6), deadline_s=1.0) as (
            rt, batch_id):
        assert store.state_counts(batch_id) == {BATCHED: 6}  # parked before the deadline
        time.sleep(1.1)
        runner.tick(rt)
        assert rt.dispatcher.join(timeout=30)  # type: ignore[attr-defined]
        counts = store.state_counts(batch_id)
        assert sum(counts.get(x, 0) for x in FINISHED) == 6, counts
        assert not s.batches("openai")  # nothing was sent to the batch API
        assert not any(BATCH_FLAG in (a.flags or "") for a in store.attempts(batch_id))


@pytest.mark.integration
def test_a_failing_step_leaves_the_tick_and_the_run_standing(
        sim: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that raises (the store briefly unreachable, say) is logged; the row is
    released, the tick returns, and the next tick does the step again."""
    s = sim()
    store = Store()
    with ingested(s, store, make_batch(tmp_path / "b.jsonl", 6)) as (rt, batch_id):
        real_poll = runner._poll
        failures: list[int] = []

        def flaky_poll(*args: Any) -> None:
            if not failures:
                failures.append(1)
                raise RuntimeError("database is locked")
            real_poll(*args)

        monkeypatch.setattr(runner, "_poll", flaky_poll)
        assert runner.tick(rt).submitted == 1
        time.sleep(0.25)
        runner.tick(rt)  # the poll raises: logged, the tick returns
        assert failures and spb.of_batch(store, batch_id)[0].lease_until is None
        wait_for(lambda: settled(rt, batch_id), 30, "the batch to finish")
        counts = store.state_counts(batch_id)
        assert sum(counts.get(x, 0) for x in FINISHED) == 6, counts


def test_a_parked_jobs_hold_is_read_with_its_lease_id_and_from_before_leases() -> None:
    """Parked jobs keep their budget hold in their options: {"id", "parts"} now, a bare
    list of parts when parked by a version before holds were leases."""
    from batchroute.store import Job

    def job(options: dict[str, Any]) -> Job:
        return Job(id="j", batch_id="b", custom_id="c", body={}, options=options)

    parts = [["batch:b", 1.0, 0.25], ["project", 5.0, 0.25]]
    now = runner._hold_of(job({"budget_hold": {"id": "abc", "parts": parts}}))
    assert now.id == "abc" and now.parts == (("batch:b", 1.0, 0.25), ("project", 5.0, 0.25))
    before = runner._hold_of(job({"budget_hold": parts}))
    assert before.id == "" and before.parts == now.parts
    assert runner._hold_of(job({})).parts == ()


def test_a_hostile_timestamp_in_a_batch_listing_is_no_time_at_all() -> None:
    """The lookup reads created_at from the provider's listing: 1e300, NaN, a year past
    9999 or a megabyte of text are None, not an exception out of the tick."""
    cases: tuple[Any, ...] = (1e300, float("nan"), float("inf"), -1e300,
                              "99999-01-01T00:00:00Z", "x" * 1_000_000, None, [], True)
    for bad in cases:
        assert runner._parse_time(bad) is None, bad
    assert runner._parse_time(0) == datetime(1970, 1, 1, tzinfo=UTC)
    assert runner._parse_time("2026-12-04T10:00:00Z") == datetime(2026, 12, 4, 10, tzinfo=UTC)
