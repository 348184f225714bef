"""Escalation, validator verdicts and the adaptive cascade through the real pipeline: the
embedded runner (in-process dispatcher, simulator over HTTP) and a real Celery worker on
Redis. The simulator's per-kind fail rates make the cheap tier fail one task and pass
another, deterministically per prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batchroute.cli import main
from batchroute.client import Client
from batchroute.config import Config, parse_config
from batchroute.dispatch import CeleryDispatcher
from batchroute.embedded import run_file
from batchroute.ingest import ingest_file
from batchroute.reports import batch_report
from batchroute.store import FINISHED, SUCCEEDED, Store

from .conftest import wait_for

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                           "email": {"type": "string"}},
          "required": ["name", "email"], "additionalProperties": False}


def extract_line(i: int, tag: str = "") -> dict[str, Any]:
    return {"custom_id": f"ext{tag}-{i}", "body": {
        "model": "auto", "max_tokens": 100,
        "messages": [{"role": "system", "content": "Extract the contact as JSON."},
                     {"role": "user", "content": f"Hello, this is Person {tag}{i}.\n"
                                                 f"Name: Person {tag}{i}\n"
                                                 f"Email: p{tag}{i}@example.com"}],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "contact", "schema": SCHEMA}}},
        "batchroute": {"task": "extract"}}


def classify_line(i: int, tag: str = "", **extra: Any) -> dict[str, Any]:
    return {"custom_id": f"cls{tag}-{i}", "body": {
        "model": "auto", "max_tokens": 10,
        "messages": [{"role": "user", "content": f"Ticket #{tag}{i}: I was charged twice "
                                                 "this month.\n\nAnswer with one of: "
                                                 "billing, bug, account."}]},
        "batchroute": {"task": "classify",
                       "validators": [{"type": "choices",
                                       "choices": ["billing", "bug", "account"]}], **extra}}


def write_batch(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def config_dict(small: dict[str, Any], medium: dict[str, Any] | None = None,
                two_providers: bool = False, **cascade: Any) -> dict[str, Any]:
    """Three tiers with explicit prices (1 : 4 : 20) on the built-in simulator."""
    premium = "premium" if two_providers else "cheap"
    return {
        "providers": {"cheap": {"base_url": "sim://"}, "premium": {"base_url": "sim://"}},
        "models": {
            "small": {"provider": "cheap", "tier": 1,
                      "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
            "medium": {"provider": premium, "tier": 2,
                       "price": {"input_per_mtok": 4.0, "output_per_mtok": 8.0}},
            "large": {"provider": premium, "tier": 3,
                      "price": {"input_per_mtok": 20.0, "output_per_mtok": 40.0}},
        },
        "tasks": {name: {"ladder": [1, 2, 3], "validators": [{"type": "non_empty"},
                                                              {"type": "finish_reason"}]}
                  for name in ("default", "classify", "extract")},
        "cascade": {"min_observations": 5, "explore_rate": 0.0, "ttl_s": 0, **cascade},
        "simulator": {"seed": 3, "models": {"small": small, "medium": medium or {},
                                            "large": {}}},
    }


def output(path: Path) -> dict[str, dict[str, Any]]:
    return {x["custom_id"]: x for x in map(json.loads, path.read_text().splitlines())}


# ---- embedded runner ------------------------------------------------------------------------


def test_final_verdicts_list_every_validator_of_the_last_attempt(tmp_path: Path) -> None:
    config = parse_config(config_dict(small={"fail_rates": {"choices": 1.0}}, enabled=False))
    never = classify_line(99)
    never["batchroute"]["validators"].append({"type": "regex", "pattern": "^ZZZ$"})
    src = write_batch(tmp_path / "b.jsonl", [classify_line(1), extract_line(1), never])
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    run_file(src, out, err, config, concurrency=2)
    ok, bad = output(out), output(err)

    escalated = ok["cls-1"]["batchroute"]  # the small model's labels are all off-label
    assert escalated["tier"] == 2 and escalated["attempts"] == 2
    assert escalated["escalations"][0]["from_tier"] == 1
    assert escalated["escalations"][0]["to_tier"] == 2
    assert "choices" in escalated["escalations"][0]["reason"]
    # The final attempt's checks, every one of them, all passed.
    assert [(v["validator"], v["ok"]) for v in escalated["validators"]] == [
        ("non_empty", True), ("finish_reason", True), ("choices", True)]
    # response_format json_schema implies the schema check.
    assert [v["validator"] for v in ok["ext-1"]["batchroute"]["validators"]] == [
        "non_empty", "finish_reason", "json_schema"]

    failed = bad["cls-99"]["batchroute"]
    assert bad["cls-99"]["error"]["code"] == "validation_failed"
    assert failed["tier"] == 3 and failed["attempts"] == 3
    verdicts = {v["validator"]: v for v in failed["validators"]}
    assert set(verdicts) == {"non_empty", "finish_reason", "choices", "regex"}
    assert verdicts["choices"]["ok"] and not verdicts["regex"]["ok"]
    assert verdicts["regex"]["reason"].startswith("regex:")


def test_cascade_learns_to_skip_a_failing_tier_within_a_batch_and_at_ingest(
        tmp_path: Path) -> None:
    """Tier 1 fails every extraction and no classification. After 5 failed extractions
    the next ones start at tier 2 (re-routed at their first claim, to the other provider's
    queue); a later batch is routed there at ingestion; classifications stay on tier 1."""
    config = parse_config(config_dict(small={"fail_rates": {"json": 1.0, "choices": 0.0}},
                                      two_providers=True))
    store = Store()
    lines = [extract_line(i) for i in range(20)] + [classify_line(i) for i in range(8)]
    out = tmp_path / "out.jsonl"
    outcome = run_file(write_batch(tmp_path / "a.jsonl", lines), out, None, config,
                       store=store, concurrency=1)
    assert outcome.report["succeeded"] == 28
    jobs = {j.custom_id: j for j in store.iter_jobs(outcome.report["batch_id"])}
    first_tiers = {cid: store.job_attempts(j.id)[0].tier for cid, j in jobs.items()}
    tried_small = sorted(cid for cid, t in first_tiers.items()
                         if t == 1 and cid.startswith("ext"))
    assert tried_small == sorted(f"ext-{i}" for i in range(5))  # then it learned
    for i in range(5, 20):
        job = jobs[f"ext-{i}"]
        assert job.options["cascade_skipped"] == [1]
        assert (job.tier, job.provider, job.attempt_no) == (2, "premium", 1)
    assert all(first_tiers[f"cls-{i}"] == 1 for i in range(8))

    cascade = outcome.report["cascade"]["tasks"]
    assert cascade["extract"]["skipped_tiers"] == [1]
    assert cascade["classify"]["skipped_tiers"] == []
    t1 = cascade["extract"]["tiers"]["1"]
    assert (t1["answered"], t1["passes"], t1["accepted"]) == (5, 0, 0)
    assert t1["router"]["skipped"] and "skipped" in t1["router"]["reason"]

    # Cost per accepted output, as the report defines it.
    attempts = store.attempts(outcome.report["batch_id"])
    cost = {j.id: sum(a.cost_usd for a in attempts if a.job_id == j.id) for j in jobs.values()}
    at2 = [j.id for j in jobs.values() if j.state == SUCCEEDED and j.tier == 2]
    by2 = outcome.report["by_tier"]["2"]
    assert by2["accepted_cost_usd"] == pytest.approx(sum(cost[i] for i in at2), abs=1e-9)
    assert by2["cost_per_success_usd"] == pytest.approx(by2["accepted_cost_usd"] / len(at2),
                                                        abs=1e-9)
    assert cascade["extract"]["tiers"]["2"]["cost_per_accepted_usd"] == pytest.approx(
        sum(cost[j.id] for j in jobs.values() if j.task == "extract") / 20, abs=1e-9)
    report = outcome.report
    assert report["accepted_cost_usd"] + report["unaccepted_cost_usd"] == pytest.approx(
        report["cost_usd"], abs=1e-9)

    # Next batch: the start tier is chosen at ingestion (no re-routing needed).
    later = write_batch(tmp_path / "b.jsonl", [extract_line(i, "b") for i in range(5)]
                        + [classify_line(i, "b") for i in range(3)])
    ingested = ingest_file(config, store, None, later)
    routed = {j.custom_id: (j.tier, j.provider) for j in store.iter_jobs(ingested.batch_id)}
    assert routed == {**{f"extb-{i}": (2, "premium") for i in range(5)},
                      **{f"clsb-{i}": (1, "cheap") for i in range(3)}}


def test_exploration_keeps_a_deterministic_share_on_the_skipped_tier(tmp_path: Path) -> None:
    from batchroute.cascade import explores

    config = parse_config(config_dict(small={"fail_rates": {"json": 1.0}}, explore_rate=0.3))
    store = Store()
    run_file(write_batch(tmp_path / "a.jsonl", [extract_line(i) for i in range(10)]),
             tmp_path / "a.out", None, config, store=store, concurrency=1)
    ingested = ingest_file(config, store, None,
                           write_batch(tmp_path / "b.jsonl",
                                       [extract_line(i, "b") for i in range(40)]))
    jobs = list(store.iter_jobs(ingested.batch_id))
    on_small = {j.id for j in jobs if j.tier == 1}
    assert on_small == {j.id for j in jobs if explores(j.id, 1, 0.3)}
    assert 0 < len(on_small) < len(jobs)


# ---- a real Celery worker -------------------------------------------------------------------


def _done(store: Store, batch_id: str, total: int) -> bool:
    counts = store.state_counts(batch_id)
    return sum(counts.get(s, 0) for s in FINISHED) >= total


@pytest.mark.integration
def test_celery_worker_skips_tiers_at_start_and_on_escalation(
        start_worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tier 1 fails every extraction and half the classifications; tier 2 fails every
    classification. Once the worker has seen enough, extractions start at tier 2 and
    classifications that fail tier 1 go straight to tier 3."""
    data = config_dict(small={"fail_rates": {"json": 1.0, "choices": 0.5}},
                       medium={"fail_rates": {"choices": 1.0}}, ttl_s=0.2)
    cfg_path = tmp_path / "routing.toml"
    cfg_path.write_text(_toml(data))
    monkeypatch.setenv("BATCHROUTE_CONFIG", str(cfg_path))
    worker = start_worker(concurrency=8)
    runner = CliRunner()
    store = Store()

    def submit_and_wait(path: Path) -> str:
        res = runner.invoke(main, ["submit", str(path), "--json"])
        assert res.exit_code == 0, res.output
        batch_id, jobs = json.loads(res.stdout)["batch_id"], json.loads(res.stdout)["jobs"]
        wait_for(lambda: _done(store, batch_id, jobs), 120,
                 f"batch {batch_id}; worker log:\n{worker.log()[-3000:]}")
        return str(batch_id)

    warm = submit_and_wait(write_batch(
        tmp_path / "warm.jsonl",
        [extract_line(i) for i in range(12)] + [classify_line(i) for i in range(24)]))
    assert batch_report(store, _cfg(data), warm)["succeeded"] == 36

    batch = submit_and_wait(write_batch(
        tmp_path / "b.jsonl",
        [extract_line(i, "b") for i in range(10)] + [classify_line(i, "b") for i in range(20)]))
    out = tmp_path / "out.jsonl"
    res = runner.invoke(main, ["results", batch, "-o", str(out)])
    assert res.exit_code == 0, res.output
    lines = output(out)
    assert len(lines) == 30 and all(x["error"] is None for x in lines.values())
    for i in range(10):  # started at tier 2 (routed at ingestion): one attempt, no escalation
        meta = lines[f"extb-{i}"]["batchroute"]
        assert (meta["tier"], meta["attempts"], meta["escalations"]) == (2, 1, [])
    escalated = [x["batchroute"] for cid, x in lines.items()
                 if cid.startswith("cls") and x["batchroute"]["escalations"]]
    assert escalated, "half the classifications fail tier 1"
    for meta in escalated:  # tier 2 skipped on escalation, the skip recorded
        (esc,) = meta["escalations"]
        assert (esc["from_tier"], esc["to_tier"], esc["skipped_tiers"]) == (1, 3, [2])
        assert "choices" in esc["reason"]
        assert (meta["tier"], meta["attempts"]) == (3, 2)
    assert not any(a.tier == 2 and a.task == "classify" for a in store.attempts(batch))

    report = json.loads(runner.invoke(main, ["report", batch, "--json"]).stdout)
    tasks = report["cascade"]["tasks"]
    assert tasks["extract"]["skipped_tiers"] == [1]
    assert tasks["classify"]["skipped_tiers"] == [2]
    rendered = runner.invoke(main, ["report", batch]).output
    assert "adaptive cascade (on" in rendered and "skip" in rendered

    # A job enqueued from code is routed without the cascade; the worker moves it at claim.
    client = Client(_cfg(data), store, CeleryDispatcher(), batch="app")
    handle = client.enqueue(messages=extract_line(500)["body"]["messages"], task="extract",
                            response_format=extract_line(500)["body"]["response_format"])
    result = handle.wait(timeout=60)
    job = store.get_job(handle.job_id)
    assert job is not None and job.options["cascade_skipped"] == [1]
    assert (result.tier, result.attempts) == (2, 1)


def _cfg(data: dict[str, Any]) -> Config:
    return parse_config(data)


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for config_dict(): nested tables of scalars, lists and inline tables."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):
            return "{ " + ", ".join(f'"{k}" = {value(x)}' for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    text = ""
    if scalars and prefix:
        text += f"[{prefix}]\n" + "".join(f'"{k}" = {value(v)}\n' for k, v in scalars.items())
    for k, v in tables.items():
        name = f'{prefix}."{k}"' if prefix else f'"{k}"'
        if not v:
            text += f"[{name}]\n"
        text += _toml(v, name)
    return text


def test_toml_helper_round_trips() -> None:
    import tomllib

    data = config_dict(small={"fail_rates": {"json": 1.0}}, medium={"fail_rate": 0.1})
    assert tomllib.loads(_toml(data)) == data
