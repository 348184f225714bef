"""End to end on a tiny made-up replay file: calibrate on its training part, then run the
test part through the real pipeline (run_file, the simulator in replay mode over HTTP)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def run_test_half(tmp_path: Path, calibrated: Path, test: list) -> tuple[Any, Path]:
    """The held-out records as a batch, run through the real pipeline under the policy."""
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps({
        "custom_id": r.id, "body": {"model": "auto", "messages": r.messages},
        "batchroute": {"task": r.task}}) + "\n" for r in test))
    out = tmp_path / "out.jsonl"
    outcome = run_file(batch, out, tmp_path / "err.jsonl", load_config(calibrated),
                       store=Store(get_engine(f"sqlite:///{tmp_path / 'run.db'}")),
                       concurrency=4)
    assert outcome.report["succeeded"] == len(test)
    return outcome, out


def test_calibrated_policy_runs_through_the_pipeline_as_calibration_predicted(
        tmp_path: Path) -> None:
    config = load_config(CONFIG)
    records = load_records(DATA / "replay_tiny.jsonl")
    train = [r for r in records if r.id.startswith("tr-")]
    test = [r for r in records if r.id.startswith("te-")]

    result = cal.calibrate(train, config, cv_folds=0)
    policy = result.tasks["qa"].policy
    # cheap keeps what its samples agree on; mid keeps its answer when it agrees with
    # cheap's (an `agree` check fed by the escalation history); big decides the rest.
    assert [r.model for r in policy.rungs] == ["cheap", "mid", "big"]
    assert [c["type"] for c in policy.rungs[1].checks] == ["agree"]
    calibrated = tmp_path / "calibrated.toml"
    calibrated.write_text(cal.to_toml(cal.policy_config(result, config,
                                                        cal.load_raw_config(config))))

    outcome, out = run_test_half(tmp_path, calibrated, test)

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
    assert outcome.report["by_model"]["mid"]["jobs"] > 0  # agree passed in the pipeline
    kept = [e for x in lines for e in x["batchroute"].get("escalations", [])
            if e.get("from_model") == "cheap"]
    assert kept and all("answer" in e for e in kept)


def test_calibrate_command_writes_a_config_to_run_with(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    write_records(train, [r for r in load_records(DATA / "replay_tiny.jsonl")
                          if r.id.startswith("tr-")])
    out = tmp_path / "policy.toml"
    result = CliRunner().invoke(main, ["--config", str(CONFIG), "calibrate", str(train),
                                       "-o", str(out), "--cv", "0", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["tasks"]["qa"]["policy"]["ladder"] == ["cheap", "mid", "big"]
    assert data["tasks"]["qa"]["met_on_train"] is True
    assert data["tasks"]["qa"]["reference"]["model"] == "big"
    loaded = load_config(out)
    assert loaded.tasks["qa"].ladder == (1, 2, 3)
    assert Path(loaded.simulator["replay"]).is_absolute()

    missing = CliRunner().invoke(main, ["--config", str(CONFIG), "calibrate", str(train),
                                        "-o", str(out), "--target", "cheap"])
    assert missing.exit_code != 0 and "use best-accuracy" in missing.output


def _scorer_dataset(n: int, start: int = 0) -> list[dict]:
    """Single-sample answers (nothing to vote on): the cheap model is right exactly on
    the 'easy' questions, the big one always. Only a scorer of the prompt can tell."""
    rows = []
    for i in range(start, start + n):
        easy = i % 3 != 0
        word = ["alpha", "beta", "gamma", "delta"][i % 4]
        rows.append({
            "id": f"q-{i:03d}", "task": "qa",
            "messages": [{"role": "user",
                          "content": f"Item {i}: an {'easy' if easy else 'hard'} {word} "
                                     "question. Answer A, B, C or D."}],
            "responses": {
                "cheap": {"content": "A" if easy else "B", "prompt_tokens": 20,
                          "completion_tokens": 1, "correct": easy},
                "big": {"content": "A", "prompt_tokens": 20, "completion_tokens": 1,
                        "correct": True}}})
    return rows


SCORER_CONFIG = """
[simulator]
replay = "test.jsonl"

[providers.replay]
kind = "openai"
base_url = "sim://"
max_retries = 0

[models.cheap]
provider = "replay"
tier = 1
price = { input_per_mtok = 0.1, output_per_mtok = 0.2 }

[models.big]
provider = "replay"
tier = 2
price = { input_per_mtok = 10.0, output_per_mtok = 30.0 }

[tasks.qa]
ladder = [1, 2]
validators = [{ type = "non_empty" }]

[tasks.default]
ladder = [1, 2]
"""


def test_scorer_rung_calibrated_on_train_runs_through_the_pipeline(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                  for r in _scorer_dataset(90)))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                 for r in _scorer_dataset(45, start=90)))
    (tmp_path / "config.toml").write_text(SCORER_CONFIG)
    config = load_config(tmp_path / "config.toml")
    train, test = load_records(tmp_path / "train.jsonl"), load_records(tmp_path / "test.jsonl")

    # Without a scorer nothing separates the cheap model's right and wrong answers.
    plain = cal.calibrate(train, config, cv_folds=0, try_answer_in=False)
    assert [r.model for r in plain.tasks["qa"].policy.rungs] == ["big"]

    result = cal.calibrate(train, config, cv_folds=3, scorer_folds=3, try_answer_in=False)
    policy = result.tasks["qa"].policy
    assert [r.model for r in policy.rungs] == ["cheap", "big"]
    assert any(c["type"] == "scorer" for c in policy.rungs[0].checks)
    assert result.tasks["qa"].cv is not None

    calibrated = tmp_path / "policy.toml"
    data = cal.policy_config(result, config, cal.load_raw_config(config),
                             scorer_dir=cal.scorer_dir_for(calibrated), base=tmp_path)
    calibrated.write_text(cal.to_toml(data))
    spec = next(s for s in data["tasks"]["qa"]["validators"] if s["type"] == "scorer")
    assert spec["model_file"].startswith("policy.scorers/") and "model" not in spec
    assert spec["tiers"] == [1]

    outcome, out = run_test_half(tmp_path, calibrated, test)
    by_id = {r.id: r for r in test}
    correct = sum(bool(by_id[x["custom_id"]].label_of(
        x["batchroute"]["model"], x["response"]["body"]["choices"][0]["message"]["content"]))
        for x in read_jsonl(out))
    offline = cal.evaluate(policy, test, config)  # the in-memory scorer, same decisions
    assert correct == offline.correct == len(test)
    assert outcome.report["cost_usd"] == pytest.approx(offline.cost_usd, rel=1e-6)
    big = cal.single_scores(test, config)["big"]
    assert outcome.report["cost_usd"] < 0.5 * big.cost_usd
    assert outcome.report["by_model"]["cheap"]["jobs"] > 0


def test_calibrate_command_writes_scorer_weights_next_to_the_policy(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _scorer_dataset(90)))
    (tmp_path / "config.toml").write_text(SCORER_CONFIG)
    out = tmp_path / "out" / "policy.toml"
    out.parent.mkdir()
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "config.toml"), "calibrate",
                                       str(train), "-o", str(out), "--cv", "0", "--scorer",
                                       "--scorer-folds", "3", "--no-answer-in", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    rung = data["tasks"]["qa"]["policy"]["rungs"][0]
    assert rung["model"] == "cheap" and rung["checks"][-1]["type"] == "scorer"
    assert "weights" in rung["checks"][-1]["model"]  # a summary, not the weights
    files = list((tmp_path / "out" / "policy.scorers").glob("*.json"))
    assert [f.name for f in files] == ["qa.cheap.json"]
    loaded = load_config(out)
    spec = next(s for s in loaded.tasks["qa"].validators if s["type"] == "scorer")
    assert Path(spec["model_file"]) == files[0]

    for flags, ladder in ((["--no-scorer"], ["big"]), ([], ["cheap", "big"])):  # on unless
        run = CliRunner().invoke(main, ["--config", str(tmp_path / "config.toml"),  # refused
                                        "calibrate", str(train), "-o", str(tmp_path / "p2.toml"),
                                        "--cv", "0", "--scorer-folds", "3", *flags,
                                        "--no-answer-in", "--json"])
        assert run.exit_code == 0, run.output
        assert json.loads(run.output)["tasks"]["qa"]["policy"]["ladder"] == ladder


def test_calibrate_without_scikit_learn_needs_it_only_when_a_scorer_is_asked_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _scorer_dataset(30)))
    (tmp_path / "config.toml").write_text(SCORER_CONFIG)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)
    args = ["--config", str(tmp_path / "config.toml"), "calibrate", str(train), "-o",
            str(tmp_path / "p.toml"), "--cv", "0"]
    quiet = CliRunner().invoke(main, args)  # the default: scorers if they can be fitted
    assert quiet.exit_code == 0, quiet.output
    assert "scikit-learn is not installed" in quiet.output
    asked = CliRunner().invoke(main, [*args, "--scorer"])
    assert asked.exit_code != 0 and "batchroute[calibrate]" in asked.output
