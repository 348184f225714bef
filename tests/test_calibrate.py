"""batchroute.calibrate on small synthetic data: pure logic, no servers."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from batchroute import calibrate as cal
from batchroute.config import Config, parse_config
from batchroute.replay import Record, Response, Sample

PRICES = {"cheap": (0.1, 0.2), "mid": (1.0, 2.0), "big": (10.0, 30.0)}


def make_config(checks: list[dict[str, Any]] | None = None) -> Config:
    return parse_config({
        "providers": {"replay": {"base_url": "sim://"}},
        "models": {m: {"provider": "replay", "tier": i + 1,
                       "price": {"input_per_mtok": p[0], "output_per_mtok": p[1]}}
                   for i, (m, p) in enumerate(PRICES.items())},
        "tasks": {"qa": {"ladder": [1, 2, 3], "validators": checks or []}},
    })


def calibrate(*args: Any, **kwargs: Any) -> cal.Calibration:
    """The tests of the older checks: `agree` and `answer_in` off, since the synthetic
    wrong answers never coincide nor repeat (agreeing, or answering "right", is always
    right here; see the tests of those checks)."""
    return cal.calibrate(*args, **{"try_agree": False, "try_answer_in": False, **kwargs})


def record(i: int, right: dict[str, bool | list[bool]], task: str = "qa") -> Record:
    """Model answers are "right"/"wrong-<i>"; a list gives several samples."""
    responses = {}
    for model, ok in right.items():
        oks = ok if isinstance(ok, list) else [ok]
        samples = tuple(Sample("right" if o else f"wrong-{i}-{j}", 2, o)
                        for j, o in enumerate(oks))
        responses[model] = Response(10, samples)
    return Record(id=f"q{i}", task=task, messages=[{"role": "user", "content": f"q{i}"}],
                  responses=responses, reference="right")


def test_picks_the_cheap_model_alone_when_it_is_as_accurate() -> None:
    records = [record(i, {"cheap": i % 10 != 0, "mid": i % 10 != 0, "big": i % 10 != 0})
               for i in range(40)]
    result = calibrate(records, make_config()).tasks["qa"]
    assert [r.model for r in result.policy.rungs] == ["cheap"]
    assert result.met and result.train.accuracy == pytest.approx(0.9)
    assert result.train.cost_usd == pytest.approx(result.singles["cheap"].cost_usd)


def test_keeps_the_expensive_model_when_the_cheap_one_is_worse_and_nothing_tells() -> None:
    # The cheap model is wrong 30% of the time and no check can tell when: only the
    # expensive model reaches the best accuracy.
    records = [record(i, {"cheap": i % 10 >= 3, "mid": i % 10 >= 2, "big": True})
               for i in range(40)]
    result = calibrate(records, make_config([{"type": "non_empty"}])).tasks["qa"]
    assert [r.model for r in result.policy.rungs] == ["big"]
    assert result.best_single == "big"
    assert result.train.accuracy == 1.0


def test_consensus_lets_the_cheap_model_keep_the_answers_its_samples_agree_on() -> None:
    # Cheap: right and unanimous on 70%, wrong and scattered on 30%.
    def cheap(i: int) -> list[bool]:
        return [True] * 5 if i % 10 >= 3 else [False, True, False, False, True]

    records = [record(i, {"cheap": cheap(i), "mid": i % 10 >= 2, "big": True})
               for i in range(40)]
    config = make_config([{"type": "consensus", "k": 3, "min_agree": 2}])
    result = calibrate(records, config).tasks["qa"]
    rungs = result.policy.rungs
    assert [r.model for r in rungs] == ["cheap", "big"]
    vote = rungs[0].checks[-1]
    assert vote["type"] == "consensus"
    # Wrong answers' samples (all different) never reach 2 votes out of k; any min_agree
    # >= 2 separates them, and the search keeps the cheapest k that does.
    assert vote["k"] == 3 and vote["min_agree"] >= 2
    assert result.train.accuracy == 1.0
    assert result.train.answered_by == {"cheap": 28, "big": 12}
    assert result.train.cost_usd < 0.5 * result.singles["big"].cost_usd
    assert rungs[-1].checks == ()  # no check at the top: it could only fail jobs


def test_never_looks_at_test_data() -> None:
    # Train: the cheap model is often wrong. Test (never passed in): it is perfect.
    train = [record(i, {"cheap": i % 2 == 0, "big": True}) for i in range(20)]
    test = [record(100 + i, {"cheap": True, "big": True}) for i in range(20)]
    config = make_config()
    first = calibrate(train, config, cv_folds=5)
    assert [r.model for r in first.tasks["qa"].policy.rungs] == ["big"]
    # Scoring on test is a separate call, and it changes nothing about the fit.
    on_test = cal.evaluate(first.tasks["qa"].policy, test, config)
    assert on_test.accuracy == 1.0
    again = calibrate(train, config, cv_folds=5)
    assert again.to_dict() == first.to_dict()
    assert first.queries == len(train)


def test_cross_validation_reports_out_of_fold_scores_and_falls_back_to_one_model() -> None:
    records = [record(i, {"cheap": i % 10 >= 3, "mid": i % 10 >= 2, "big": True})
               for i in range(40)]
    result = calibrate(records, make_config(), cv_folds=4, seed=1).tasks["qa"]
    assert result.cv is not None and result.cv.folds == 4
    assert result.cv.repeats == cal.CV_REPEATS
    assert result.cv.baseline.queries == 40 * cal.CV_REPEATS  # each record held out per repeat
    assert "rungs<=1, margin=0" in result.cv.settings
    assert [r.model for r in result.policy.rungs] == ["big"]


def test_cost_target_maximises_accuracy_under_the_cap() -> None:
    records = [record(i, {"cheap": i % 10 >= 3, "mid": i % 10 >= 1, "big": True})
               for i in range(40)]
    config = make_config()
    singles = cal.single_scores(records, config)
    cap = (singles["mid"].cost_per_query + singles["big"].cost_per_query) / 2
    result = calibrate(records, config, cal.Target.parse(None, max_cost_usd=cap),
                           free_top=True)
    task = result.tasks["qa"]
    assert [r.model for r in task.policy.rungs] == ["mid"]
    assert task.met and task.train.cost_per_query <= cap


def test_targets_parse() -> None:
    assert cal.Target.parse(None).kind == "best"
    assert cal.Target.parse("best-accuracy").kind == "best"
    assert cal.Target.parse("0.9") == cal.Target("accuracy", 0.9)
    assert cal.Target.parse("95%") == cal.Target("relative", 0.95)
    assert cal.Target.parse(None, max_cost_usd=0.01) == cal.Target("cost", 0.01)
    with pytest.raises(cal.CalibrationError, match="use best-accuracy"):
        cal.Target.parse("cheap")
    with pytest.raises(cal.CalibrationError, match="not both"):
        cal.Target.parse("0.9", max_cost_usd=1.0)


def test_relative_target_accepts_a_cheaper_less_accurate_model() -> None:
    records = [record(i, {"cheap": i % 20 != 0, "big": True}) for i in range(40)]
    result = calibrate(records, make_config(), cal.Target.parse("95%"), free_top=True)
    assert [r.model for r in result.tasks["qa"].policy.rungs] == ["cheap"]
    # Without --free-top the ladder ends on the reference ("big", the most accurate).
    fixed = calibrate(records, make_config(), cal.Target.parse("95%"))
    assert fixed.tasks["qa"].policy.rungs[-1].model == "big"
    assert fixed.tasks["qa"].reference == "big"


def test_unlabelled_or_unpriced_data_is_refused_with_a_reason() -> None:
    unlabelled = Record("q", "qa", [{"role": "user", "content": "q"}],
                        {"cheap": Response(1, (Sample("a", 1, None),))})
    with pytest.raises(cal.CalibrationError, match="no 'correct' label"):
        calibrate([unlabelled], make_config())
    other_task = record(1, {"cheap": True}, task="summarize")
    with pytest.raises(cal.CalibrationError, match=r"no \[tasks.summarize\] profile"):
        calibrate([other_task], make_config())


def test_policy_config_writes_a_loadable_routing_config() -> None:
    def cheap(i: int) -> list[bool]:
        return [True] * 5 if i % 10 >= 3 else [False, True, False, False, True]

    records = [record(i, {"cheap": cheap(i), "mid": i % 10 >= 2, "big": True})
               for i in range(40)]
    config = make_config([{"type": "non_empty"}, {"type": "consensus", "k": 5}])
    result = calibrate(records, config)
    data = cal.policy_config(result, config)
    text = cal.to_toml(data, cal.header(result))
    assert text.startswith("# Written by `batchroute calibrate`")
    loaded = parse_config(tomllib.loads(text))
    assert sorted(loaded.models) == ["big", "cheap"]
    assert loaded.models["cheap"].tier == 1 and loaded.models["big"].tier == 2
    assert loaded.models["big"].price is not None
    qa = loaded.tasks["qa"]
    assert qa.ladder == (1, 2)
    assert all(v["tiers"] == [1] for v in qa.validators)
    assert loaded.tasks["default"].ladder == (1, 2)
    assert loaded.cascade.enabled is False  # the calibrated ladder is not re-decided at run time


def test_toml_writer_quotes_keys_and_round_trips() -> None:
    data = {"models": {"org/model-7b": {"tier": 1, "price": {"input_per_mtok": 1e-06,
                                                             "output_per_mtok": 2.5}}},
            "tasks": {"t": {"validators": [{"type": "regex", "pattern": "\\d+\"x\"\n"}]}},
            "simulator": {"replay": "a b.jsonl"}}
    assert tomllib.loads(cal.to_toml(data)) == data
