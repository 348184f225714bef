"""End to end on a tiny made-up replay file: calibrate on its training part, then run the
test part through the real pipeline (run_file, the simulator in replay mode over HTTP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchroute import calibrate as cal
from batchroute.cli import main
from batchroute.config import load_config
from batchroute.embedded import run_file
from batchroute.replay import load_records, write_records
from batchroute.store import Store, get_engine

DATA = Path(__file__).parent / "data"
CONFIG = DATA / "replay_tiny.toml"


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_calibrated_policy_runs_through_the_pipeline_as_calibration_predicted(
        tmp_path: Path) -> None:
    config = load_config(CONFIG)
    records = load_records(DATA / "replay_tiny.jsonl")
    train = [r for r in records if r.id.startswith("tr-")]
    test = [r for r in records if r.id.startswith("te-")]

    result = cal.calibrate(train, config, cv_folds=0)
    policy = result.tasks["qa"].policy
    assert [r.model for r in policy.rungs] == ["cheap", "big"]
    calibrated = tmp_path / "calibrated.toml"
    calibrated.write_text(cal.to_toml(cal.policy_config(result, config,
                                                        cal.load_raw_config(config))))

    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps({
        "custom_id": r.id, "body": {"model": "auto", "messages": r.messages},
        "batchroute": {"task": r.task}}) + "\n" for r in test))
    out = tmp_path / "out.jsonl"
    outcome = run_file(batch, out, tmp_path / "err.jsonl", load_config(calibrated),
                       store=Store(get_engine(f"sqlite:///{tmp_path / 'run.db'}")),
                       concurrency=4)
    assert outcome.report["succeeded"] == len(test)

    by_id = {r.id: r for r in test}
    lines = read_jsonl(out)
    correct = 0
    for line in lines:
        record = by_id[line["custom_id"]]
        body = line["response"]["body"]
        label = record.label_of(line["batchroute"]["model"],
                                body["choices"][0]["message"]["content"])
        assert label is not None
        correct += label
        if line["batchroute"]["model"] == "cheap":  # the consensus rung asked for k samples
            k = policy.rungs[0].checks[-1]["k"]
            assert len(body["choices"]) == k

    offline = cal.evaluate(policy, test, config)
    assert correct == offline.correct
    assert outcome.report["cost_usd"] == pytest.approx(offline.cost_usd, rel=1e-6)
    big = cal.single_scores(test, config)["big"]
    assert correct >= big.correct
    assert outcome.report["cost_usd"] < 0.5 * big.cost_usd
    assert outcome.report["by_model"]["cheap"]["jobs"] > 0


def test_calibrate_command_writes_a_config_to_run_with(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    write_records(train, [r for r in load_records(DATA / "replay_tiny.jsonl")
                          if r.id.startswith("tr-")])
    out = tmp_path / "policy.toml"
    result = CliRunner().invoke(main, ["--config", str(CONFIG), "calibrate", str(train),
                                       "-o", str(out), "--cv", "0", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["tasks"]["qa"]["policy"]["ladder"] == ["cheap", "big"]
    assert data["tasks"]["qa"]["met_on_train"] is True
    loaded = load_config(out)
    assert loaded.tasks["qa"].ladder == (1, 2)
    assert Path(loaded.simulator["replay"]).is_absolute()

    missing = CliRunner().invoke(main, ["--config", str(CONFIG), "calibrate", str(train),
                                        "-o", str(out), "--target", "cheap"])
    assert missing.exit_code != 0 and "use best-accuracy" in missing.output
