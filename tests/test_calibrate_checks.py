"""Issue #16: the reference model on top, paired out-of-fold margins, and the `agree` /
`answer_in` checks (as validators, in the offline replay and chosen by calibration).
Pure logic on small synthetic data, no servers."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from batchroute import calibrate as cal
from batchroute.calibrate.crossval import Setting, choose_setting, lower_bound
from batchroute.completion import Completion, Usage
from batchroute.config import parse_config
from batchroute.pipeline import earlier_answers
from batchroute.replay import Record, Response, Sample
from batchroute.validators import ValidatorError, build_validators, passed, run_validators

from .test_calibrate import make_config


def rec(i: int, answers: dict[str, str], truth: str) -> Record:
    return Record(id=f"q{i}", task="qa", messages=[{"role": "user", "content": f"q{i}"}],
                  responses={m: Response(10, (Sample(a, 2, a == truth),))
                             for m, a in answers.items()}, reference=truth)


def completion(text: str) -> Completion:
    return Completion(content=text, finish_reason="stop", usage=Usage(1, 1), model="m")


# ------------------------------------------------------------------------ validators


def test_agree_counts_this_answer_and_the_earlier_rungs() -> None:
    [agree] = build_validators([{"type": "agree", "min_agree": 2}])
    assert not passed(run_validators([agree], completion("Yes")))  # alone: collects only
    assert passed(run_validators([agree], completion("yes."), earlier=["Answer: YES"]))
    assert not passed(run_validators([agree], completion("no"), earlier=["yes", "maybe"]))
    [three] = build_validators([{"type": "agree", "min_agree": 3}])
    assert not passed(run_validators([three], completion("B"), earlier=["B", "C"]))
    assert passed(run_validators([three], completion("B"), earlier=["B", "(b)"]))
    [num] = build_validators([{"type": "agree", "extract": r"####\s*(\d+)"}])
    assert passed(run_validators([num], completion("so #### 42"), earlier=["x #### 42"]))
    assert not passed(run_validators([num], completion("no number"), earlier=["no number"]))


def test_answer_in_keeps_only_the_given_labels() -> None:
    [check] = build_validators([{"type": "answer_in", "labels": ["Yes"]}])
    assert passed(run_validators([check], completion("yes")))
    assert passed(run_validators([check], completion("**Yes**.")))
    verdicts = run_validators([check], completion("No"))
    assert not passed(verdicts) and "not one of the labels" in verdicts[0].reason


@pytest.mark.parametrize("spec", [
    {"type": "agree", "min_agree": 1},
    {"type": "agree", "votes": 2},
    {"type": "answer_in", "labels": []},
    {"type": "answer_in"},
    {"type": "answer_in", "labels": ["a"], "extract": "(a)(b)"},
])
def test_bad_specs_are_rejected_early(spec: dict[str, Any]) -> None:
    with pytest.raises(ValidatorError):
        build_validators([spec])


def test_pipeline_hands_agree_the_answers_of_the_rungs_escalated_from() -> None:
    history = [{"from_tier": 1, "reason": "x", "answer": "Yes"},
               {"from_tier": 2, "reason": "provider gave nothing"},  # no answer kept
               {"from_tier": 3, "reason": "y", "answer": "No"}]
    assert earlier_answers(history) == ["Yes", "No"]


# ------------------------------------------------------------ replay and calibration


def labelled(n: int = 60) -> list[Record]:
    """cheap and mid are each wrong on a different 20% ("No" when the truth is "Yes");
    they never agree on a wrong answer, and big is always right."""
    out = []
    for i in range(n):
        truth = "Yes" if i % 2 else "No"
        cheap = "No" if i % 10 in (1, 3) else truth
        mid = "No" if i % 10 in (5, 7) else truth
        out.append(rec(i, {"cheap": cheap, "mid": mid, "big": truth}, truth))
    return out


def test_offline_replay_gives_agree_the_earlier_answers() -> None:
    records = labelled()
    config = make_config()
    rule = cal.agreement_rule("qa", ["cheap", "mid"], "big")
    score = cal.evaluate(rule, records, config)
    assert score.accuracy == 1.0  # agreeing cheap models are always right here
    assert score.answered_by == {"mid": 36, "big": 24}
    assert score.cost_usd < cal.evaluate(cal.Policy("qa", (cal.Rung("big"),)), records,
                                         config).cost_usd


def test_calibration_finds_the_agreement_rule_and_ends_on_the_reference() -> None:
    result = cal.calibrate(labelled(), make_config(), try_answer_in=False).tasks["qa"]
    assert result.reference == "big"
    assert [r.model for r in result.policy.rungs] == ["cheap", "mid", "big"]
    assert result.policy.rungs[1].checks[0]["type"] == "agree"
    assert result.train.accuracy == 1.0


def test_calibration_finds_answer_conditioned_acceptance() -> None:
    # cheap's "Yes" answers are always right, its "No" answers half wrong.
    records = labelled()
    result = cal.calibrate(records, make_config(), try_agree=False).tasks["qa"]
    first = result.policy.rungs[0]
    assert first.model == "cheap"
    assert first.checks == ({"type": "answer_in", "labels": ["yes"]},)
    assert result.train.accuracy == 1.0


def lossy_first_rung() -> list[Record]:
    """cheap's "No" answers are its better label, yet on them it loses 2 answers to big
    and wins 1; mid agreeing with cheap's "Yes" wins 4. So `cheap [answer_in no] -> mid
    [agree] -> big` beats big in all (81 of 83 against 78) and is the cheapest ladder
    that does, with a first rung worse than big on what it keeps."""
    groups = [  # (count, truth, cheap, mid, big)
        (40, "No", "No", "No", "No"), (2, "Yes", "No", "Yes", "Yes"),
        (1, "No", "No", "No", "Yes"), (30, "Yes", "Yes", "Yes", "Yes"),
        (4, "Yes", "Yes", "Yes", "No"), (6, "No", "Yes", "No", "No")]
    out: list[Record] = []
    for count, truth, cheap, mid, big in groups:
        out += [rec(len(out), {"cheap": cheap, "mid": mid, "big": big}, truth)
                for _ in range(count)]
    return out


def test_no_rung_keeps_answers_worse_than_the_references(
        monkeypatch: pytest.MonkeyPatch) -> None:
    records = lossy_first_rung()
    config = make_config()
    monkeypatch.setattr(cal.types, "RUNG_Z", None)  # without the per-rung check
    lossy = cal.calibrate(records, config, reference="big").tasks["qa"]
    assert lossy.policy.rungs[0].checks == ({"type": "answer_in", "labels": ["no"]},)
    assert lossy.train.correct == 81
    monkeypatch.setattr(cal.types, "RUNG_Z", 0.5)
    result = cal.calibrate(records, config, reference="big").tasks["qa"]
    assert result.met and result.train.correct >= 78
    assert all(c.get("type") != "answer_in" for r in result.policy.rungs for c in r.checks)
    assert result.train.cost_usd > lossy.train.cost_usd  # safety is paid for
    # A relative target may trade accuracy away: the check is only for "best".
    relative = cal.calibrate(records, config, cal.Target.parse("95%"),
                             reference="big").tasks["qa"]
    assert relative.train.cost_usd <= lossy.train.cost_usd


def test_reference_is_the_users_and_nothing_dearer_is_used() -> None:
    records = labelled()
    result = cal.calibrate(records, make_config(), reference="mid",
                           try_agree=False).tasks["qa"]
    assert result.reference == "mid"
    assert all(r.model != "big" for r in result.policy.rungs)
    assert result.policy.rungs[-1].model == "mid"
    with pytest.raises(cal.CalibrationError, match="reference model 'nope'"):
        cal.calibrate(records, make_config(), reference="nope")


def test_lower_bound_of_paired_differences() -> None:
    assert lower_bound([0.0] * 50, 0.9) == (0.0, 0.0)
    mean, low = lower_bound([1.0, -1.0] * 50, 0.9)
    assert mean == 0.0 and low == pytest.approx(-1.2816 * (100 / 99) ** 0.5 / 10, rel=1e-3)
    assert lower_bound([0.1] * 3 + [0.0], 0.99)[1] < lower_bound([0.1] * 3 + [0.0], 0.6)[1]


def test_cross_validation_keeps_the_safest_of_the_nearly_cheapest_settings() -> None:
    ref, edge, safe, dear, lost = (Setting(1, 0), Setting(3, 0), Setting(3, 0.01),
                                   Setting(3, 0.02), Setting(2, 0))
    # Total costs over 1,000 held-out answers; the reference alone costs 100.
    scores = {ref: cal.Score(1000, 960, 100.0), edge: cal.Score(1000, 961, 8.5),
              safe: cal.Score(1000, 970, 11.2), dear: cal.Score(1000, 975, 30.0),
              lost: cal.Score(1000, 940, 5.0)}
    paired = {ref: (0.0, 0.0), edge: (0.001, -0.002), safe: (0.010, 0.007),
              dear: (0.015, 0.012), lost: (-0.02, -0.025)}
    best = cal.Target.parse("best-accuracy")
    # edge is the cheapest accepted; safe costs 2.7% of the reference more and has the
    # higher bound; dear is 21.5% more: not "nearly cheapest"; lost is rejected.
    assert choose_setting(list(scores), scores, paired, 100.0, best, 1000) == safe
    assert choose_setting([ref, edge, dear], scores, paired, 100.0, best, 1000) == edge
    assert choose_setting([ref, lost], scores, paired, 100.0, best, 1000) == ref
    strict = cal.Target.parse("best-accuracy", tolerance=0.0)
    assert choose_setting([edge, lost], scores, paired, 100.0, strict, 1000) == edge
    budget = cal.Target.parse(None, max_cost_usd=0.0112)  # USD per query
    assert choose_setting(list(scores), scores, paired, 100.0, budget, 1000) == safe


def test_cross_validation_accepts_only_what_its_paired_bound_vouches_for() -> None:
    # cheap's "yes" answers are 2 wrong in 40: keeping them costs 2.5 points, within a
    # 95% target on average but not with 99% confidence on 80 records.
    recs = []
    for i in range(80):
        truth = "yes" if i % 2 else "no"
        cheap = "yes" if i in (0, 40) else ("no" if i % 10 == 1 else truth)
        recs.append(rec(i, {"cheap": cheap, "big": truth}, truth))
    config = make_config()
    loose = cal.calibrate(recs, config, cal.Target.parse("95%", confidence=0.5),
                          cv_folds=4).tasks["qa"]
    assert loose.policy.describe() == "cheap [answer_in] -> big"
    assert loose.cv is not None
    mean, low = loose.cv.paired[loose.cv.chosen.label()]
    assert mean == pytest.approx(0.025) and low == pytest.approx(mean)
    strict = cal.calibrate(recs, config, cal.Target.parse("95%", confidence=0.99),
                           cv_folds=4).tasks["qa"]
    assert strict.policy.describe() == "big"
    assert strict.cv is not None
    cascade = strict.cv.paired["rungs<=2, margin=0"]
    assert cascade[0] == pytest.approx(0.025) and cascade[1] < -0.003  # rejected
    assert strict.cv.paired[strict.cv.chosen.label()][1] >= -0.003


def test_header_gives_out_of_fold_figures_only() -> None:
    calibration = cal.calibrate(labelled(80), make_config(), cv_folds=4)
    task = calibration.tasks["qa"]
    assert task.cv is not None and task.cv.kept.accuracy == 1.0
    assert len(task.policy.rungs) >= 2
    header = cal.header(calibration)
    assert "out of fold" in header and "train: accuracy" not in header
    assert "reference model: big" in header


def test_policy_file_round_trip_scores_the_same() -> None:
    records = labelled()
    config = make_config()
    calibration = cal.calibrate(records, config)
    written = cal.to_toml(cal.policy_config(calibration, config))
    loaded = parse_config(tomllib.loads(written))
    policy = cal.policy_from_config(loaded, "qa")
    assert [r.model for r in policy.rungs] == \
        [r.model for r in calibration.tasks["qa"].policy.rungs]
    assert cal.evaluate(policy, records, loaded) == \
        cal.evaluate(calibration.tasks["qa"].policy, records, config)


def test_bagged_scorer_averages_the_fold_models_logits() -> None:
    from batchroute import scorer

    a = scorer.Scorer({1: 2.0, 2: -1.0}, 0.5)
    b = scorer.Scorer({1: 0.0, 3: 4.0}, -0.5)
    bag = scorer.bagged([a, b], {"model": "m"})
    row = {1: 1.0, 2: 1.0, 3: 0.5}
    mean = (scorer._logit(a, row) + scorer._logit(b, row)) / 2
    assert scorer._logit(bag, row) == pytest.approx(mean)
    assert bag.meta is not None and bag.meta["bagged"] == 2
    assert scorer.Scorer.from_dict(bag.to_dict()).weights == bag.weights


def test_out_of_fold_on_a_prebuilt_design_matches_the_per_fit_path() -> None:
    pytest.importorskip("sklearn")
    from batchroute import scorer

    rows = [scorer.features(f"question {i % 7}", "yes" if i % 3 else "no") for i in range(60)]
    labels = [bool(i % 3) for i in range(60)]
    slow, _ = scorer.out_of_fold_models(rows, labels, 4, seed=3)
    matrix, columns = scorer.design(rows)
    fast, models = scorer.out_of_fold_design(matrix, columns, labels, 4, seed=3)
    assert fast == pytest.approx(slow, abs=1e-6)
    assert len(models) == 4


def test_default_reference_is_the_model_the_queries_asked_for() -> None:
    from dataclasses import replace

    from batchroute.replay import parse_record, record_json

    records = [replace(r, model="mid") for r in labelled()]
    assert parse_record(record_json(records[0])).model == "mid"
    assert parse_record({**record_json(records[0]), "model": "auto"}).model is None
    result = cal.calibrate(records, make_config(), try_agree=False).tasks["qa"]
    assert result.reference == "mid" and result.policy.rungs[-1].model == "mid"


def test_prompt_ngrams_shared_by_nearly_every_prompt_are_left_out() -> None:
    from batchroute import scorer

    prompts = [f"Examples: two plus two is four. Question {i}: what is {i} plus one?"
               for i in range(30)]
    stop = scorer.stop_grams(prompts)
    assert "examples" in stop and "plus one" in stop and "question" in stop
    assert "7" not in stop
    assert scorer.stop_grams(prompts[:5]) == frozenset()  # too few to tell
    kept = scorer.features(prompts[7], "8", stop=stop)
    assert len(kept) < len(scorer.features(prompts[7], "8"))
    s = scorer.Scorer({1: 0.5}, 0.1, stop=stop)
    again = scorer.Scorer.from_dict(s.to_dict())
    assert again.stop == stop and again.score(prompts[7], "8") == s.score(prompts[7], "8")
    with pytest.raises(scorer.ScorerError, match="stop"):
        scorer.Scorer.from_dict({**s.to_dict(), "stop": [1]})


def test_cross_validation_tries_ladders_with_and_without_learned_scorers() -> None:
    from .test_calibrate import record

    # cheap is right exactly on the prompts that say "easy": only a scorer can tell.
    recs = []
    for i in range(120):
        r = record(i, {"cheap": i % 2 == 0, "big": True})
        word = "easy" if i % 2 == 0 else "hard"
        recs.append(Record(r.id, r.task, [{"role": "user", "content": f"q{i} {word}"}],
                           r.responses, r.reference))
    result = cal.calibrate(recs, make_config(), cv_folds=4, scorer_folds=3, seed=1,
                           try_agree=False, try_answer_in=False).tasks["qa"]
    assert result.cv is not None
    labels = set(result.cv.settings)
    assert "rungs<=2, margin=0" in labels and "rungs<=2, margin=0, scorer" in labels
    assert result.cv.chosen.scorer
    assert result.policy.describe().startswith("cheap [scorer")
    # The same ladders without scorers cannot save anything here.
    plain = result.cv.settings["rungs<=2, margin=0"]
    assert plain.cost_usd == pytest.approx(result.cv.baseline.cost_usd)
