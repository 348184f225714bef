"""The embedded `batchroute run`: SQLite file, in-process dispatcher, simulator over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchroute.cli import main
from batchroute.config import load_config
from batchroute.embedded import run_file
from batchroute.store import Store, get_engine

from .conftest import EXAMPLE


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def example_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path, Store]:
    tmp = tmp_path_factory.mktemp("run")
    store = Store(get_engine(f"sqlite:///{tmp / 'run.db'}"))
    out, err = tmp / "out.jsonl", tmp / "errors.jsonl"
    outcome = run_file(EXAMPLE, out, err, load_config(), store=store)
    return outcome.report, out, err, store


def test_every_input_line_has_exactly_one_output_line(example_run) -> None:
    report, out, err, _ = example_run
    ids_in = [json.loads(line)["custom_id"] for line in EXAMPLE.read_text().splitlines()]
    ids_out = [r["custom_id"] for r in read_jsonl(out) + read_jsonl(err)]
    assert sorted(ids_out) == sorted(ids_in)
    assert report["jobs"] == len(ids_in)
    assert report["succeeded"] + report["failed"] == len(ids_in)
    assert report["succeeded"] > 0.9 * len(ids_in)


def test_output_lines_follow_the_openai_batch_format(example_run) -> None:
    _, out, err, _ = example_run
    ok = read_jsonl(out)[0]
    assert ok["error"] is None
    assert ok["response"]["status_code"] == 200
    assert ok["response"]["body"]["object"] == "chat.completion"
    assert ok["response"]["body"]["choices"][0]["message"]["content"]
    meta = ok["batchroute"]
    assert {"tier", "provider", "model", "attempts", "cost_usd", "escalations"} <= set(meta)
    for bad in read_jsonl(err):
        assert bad["response"] is None
        assert bad["error"]["code"] and bad["error"]["message"]


def test_cheap_tier_failures_escalate_and_attempts_show_it(example_run) -> None:
    report, out, _, store = example_run
    escalated = [r for r in read_jsonl(out) if r["batchroute"]["escalations"]]
    assert escalated, "the simulator's tier-1 model fails ~30% of answers: some jobs must escalate"
    r = escalated[0]
    assert r["batchroute"]["attempts"] >= 2
    assert r["batchroute"]["tier"] > r["batchroute"]["escalations"][0]["from_tier"]
    attempts = store.job_attempts(r["id"].removeprefix("batch_req_"))
    assert attempts[0].outcome == "invalid" and attempts[0].reason
    assert attempts[-1].outcome == "ok"
    assert 0 < report["escalation_rate"] < 1


def test_report_totals_equal_the_sum_of_attempts(example_run) -> None:
    report, _, _, store = example_run
    attempts = store.attempts(report["batch_id"])
    assert report["attempts"] == len(attempts)
    assert report["cost_usd"] == pytest.approx(sum(a.cost_usd for a in attempts), abs=1e-9)
    for key in ("by_tier", "by_model", "by_provider", "by_task"):
        assert sum(b["cost_usd"] for b in report[key].values()) == pytest.approx(
            report["cost_usd"], abs=1e-7)
        assert sum(b["attempts"] for b in report[key].values()) == len(attempts)
    assert sum(b["jobs"] for b in report["by_task"].values()) == report["jobs"]


def test_routing_saves_money_against_the_reference_models(example_run) -> None:
    report, *_ = example_run
    assert report["baseline_cost_usd"] > report["cost_usd"] > 0
    assert report["savings_pct"] > 0
    assert set(report) >= {"jobs", "succeeded", "failed", "cost_usd", "baseline_cost_usd",
                           "savings_pct", "escalation_rate", "by_tier", "by_model",
                           "by_provider", "by_task", "cost_per_success_usd"}


def test_rerunning_the_same_file_duplicates_nothing(example_run, tmp_path: Path) -> None:
    report, _, _, store = example_run
    again = run_file(EXAMPLE, tmp_path / "o.jsonl", None, load_config(), store=store)
    assert again.report["batch_id"] == report["batch_id"]
    assert again.report["jobs"] == report["jobs"]
    assert again.report["attempts"] == report["attempts"]  # nothing ran twice


def test_malformed_lines_are_reported_by_number_and_the_rest_completes(tmp_path: Path) -> None:
    lines = EXAMPLE.read_text().splitlines()[:30]
    lines[4] = '{"custom_id": "broken", "body": {'
    lines[9] = json.dumps({"custom_id": "nomsg", "body": {"model": "auto"}})
    lines[14] = lines[13]  # duplicate custom_id
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["run", str(src), "-o", str(tmp_path / "out.jsonl"),
                                       "--errors", str(tmp_path / "err.jsonl"),
                                       "--report-json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "line 5: invalid JSON" in result.output
    assert "line 10: body.messages" in result.output
    assert "line 15: custom_id: duplicate" in result.output
    errors = read_jsonl(tmp_path / "err.jsonl")
    bad = {e["error"]["line"] for e in errors if e["error"]["code"] == "invalid_line"}
    assert bad == {5, 10, 15}
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["jobs"] == 27
    assert report["bad_lines"] == 3
    assert report["succeeded"] + report["failed"] == 27
    assert len(read_jsonl(tmp_path / "out.jsonl")) == report["succeeded"]
