"""The learned per-query scorer: features, fit, pure-Python application, the check."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from batchroute import scorer as sc
from batchroute.completion import Completion, Usage
from batchroute.config import load_config
from batchroute.validators import ValidatorError, build_validators, passed, run_validators

pytest.importorskip("sklearn")

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def synthetic(n: int, seed: int = 0) -> tuple[list[tuple[str, str]], list[bool]]:
    """Queries about 'easy' topics are answered right, about 'hard' ones wrong."""
    rng = random.Random(seed)
    items, labels = [], []
    for i in range(n):
        easy = i % 2 == 0
        words = " ".join(rng.choice(WORDS) for _ in range(6))
        prompt = f"Question {i}: {'easy' if easy else 'hard'} topic. {words}?"
        items.append((prompt, rng.choice(["A", "B", "C", "D"])))
        labels.append(easy)
    return items, labels


def rows_of(items: list[tuple[str, str]]) -> list[dict[int, float]]:
    return [sc.features(p, a) for p, a in items]


def completion(text: str) -> Completion:
    return Completion(content=text, finish_reason="stop", usage=Usage(10, 1), model="m")


def request(prompt: str) -> dict:
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": prompt}]}


@pytest.fixture(scope="module")
def fitted() -> sc.Scorer:
    items, labels = synthetic(80)
    return sc.fit(rows_of(items), labels, meta={"model": "cheap"})


def test_features_are_deterministic_across_processes() -> None:
    here = sc.features("What is the capital of France?", "Paris")
    assert here == sc.features("What is the capital of France?", "Paris")
    code = ("import json; from batchroute import scorer as s; "
            "print(json.dumps(sorted(s.features('What is the capital of France?', "
            "'Paris').items())))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # hash() would differ; crc32 must not
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert [tuple(x) for x in json.loads(out)] == sorted(here.items())
    assert all(0 <= i < sc.DEFAULT_DIM for i in here)


def test_prompt_text_is_the_last_user_message() -> None:
    body = {"messages": [{"role": "user", "content": "first"},
                         {"role": "assistant", "content": "x"},
                         {"role": "user", "content": [{"type": "text", "text": "second"}]}]}
    assert sc.prompt_text(body) == "second"
    assert sc.prompt_text(None) == ""
    assert sc.prompt_text({"messages": "nope"}) == ""


def test_fitted_scorer_separates_a_separable_dataset(fitted: sc.Scorer) -> None:
    held, labels = synthetic(40, seed=1)
    scores = [fitted.score(p, a) for p, a in held]
    assert min(s for s, y in zip(scores, labels, strict=True) if y) > 0.5
    assert max(s for s, y in zip(scores, labels, strict=True) if not y) < 0.5


def test_pure_python_application_equals_sklearn_predict_proba(fitted: sc.Scorer) -> None:
    items, labels = synthetic(80)
    held, _ = synthetic(30, seed=2)
    expected = sc.sklearn_proba(rows_of(items), labels, rows_of(held))
    got = [fitted.score(p, a) for p, a in held]
    assert got == pytest.approx(expected, abs=1e-9)


def test_json_round_trip_scores_identically(fitted: sc.Scorer, tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    fitted.save(path)
    loaded = sc.load(path)
    assert loaded.score("Question 3: easy topic?", "B") == fitted.score(
        "Question 3: easy topic?", "B")
    assert loaded.meta is not None and loaded.meta["model"] == "cheap"


def labelled(n: int, seed: int = 0) -> tuple[list[tuple[str, str]], list[bool]]:
    """A Yes/No task whose prompt gives the label away ('disavow' reads Yes, 'miles'
    reads No), answered by a model that guesses: right exactly when its answer matches
    the cue. Neither the prompt nor the answer alone says anything about rightness."""
    rng = random.Random(seed)
    items, labels = [], []
    for i in range(n):
        truth = rng.choice(["Yes", "No"])
        cue = "disavow" if truth == "Yes" else "miles"
        words = " ".join(rng.choice(WORDS) for _ in range(6))
        answer = rng.choice(["Yes", "No"])
        items.append((f"Context {i}: {words} {cue}. Is it overruling?", answer))
        labels.append(answer == truth)
    return items, labels


def _auc(scores: list[float], labels: list[bool]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def test_crossed_features_let_a_scorer_learn_a_label_task() -> None:
    items, labels = labelled(200)
    held, held_labels = labelled(100, seed=1)
    plain = sc.fit([sc.features(p, a) for p, a in items], labels)
    crossed = sc.bagged([sc.fit([sc.features(p, a, cross=True) for p, a in items], labels)],
                        cross=True)
    assert _auc([plain.score(p, a) for p, a in held], held_labels) < 0.7
    assert _auc([crossed.score(p, a) for p, a in held], held_labels) > 0.95


def test_crossed_features_only_for_short_answers_and_kept_in_the_file(
        tmp_path: Path) -> None:
    long_answer = "def f(x):\n    return x + 1  # a program, not a label" * 2
    assert sc.features("p q", long_answer, cross=True) == sc.features("p q", long_answer)
    assert sc.features("p q", "Yes", cross=True) != sc.features("p q", "Yes")
    items, labels = labelled(60)
    s = sc.bagged([sc.fit([sc.features(p, a, cross=True) for p, a in items], labels)],
                  cross=True)
    s.save(tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["cross"] is True
    loaded = sc.load(tmp_path / "s.json")
    assert loaded.cross and loaded.score(*items[0]) == s.score(*items[0])
    # A file written before crossing existed has no "cross": read as uncrossed.
    old = s.to_dict()
    del old["cross"]
    assert sc.Scorer.from_dict(old).cross is False
    with pytest.raises(sc.ScorerError, match=r"\.cross"):
        sc.Scorer.from_dict({**old, "cross": "yes"})


def test_one_class_training_gives_a_constant_scorer() -> None:
    s = sc.fit([{1: 1.0}, {2: 1.0}], [True, True])
    assert not s.weights and s.score("anything", "x") > 0.99


def test_out_of_fold_scores_do_not_see_their_own_label() -> None:
    items, labels = synthetic(60)
    oof = sc.out_of_fold(rows_of(items), labels, folds=3)
    assert len(oof) == 60
    right = sum((p >= 0.5) == y for p, y in zip(oof, labels, strict=True))
    assert right >= 54  # separable: out of fold it still generalises


def test_validator_accepts_and_rejects_by_threshold(fitted: sc.Scorer, tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    fitted.save(path)
    easy, hard = "Question 99: easy topic. alpha?", "Question 98: hard topic. alpha?"
    p_easy, p_hard = fitted.score(easy, "A"), fitted.score(hard, "A")
    threshold = (p_easy + p_hard) / 2
    checks = build_validators([{"type": "scorer", "model_file": str(path),
                                "threshold": threshold}])
    ok = run_validators(checks, completion("A"), request=request(easy))
    assert passed(ok) and ok[0].score == pytest.approx(p_easy)
    bad = run_validators(checks, completion("A"), request=request(hard))
    assert not passed(bad) and "P(correct)" in bad[0].reason
    # Without the request there is nothing to score: fail (escalate), never guess.
    assert not passed(run_validators(checks, completion("A")))
    inline = build_validators([{"type": "scorer", "model": fitted.to_dict(),
                                "threshold": threshold}])
    assert passed(run_validators(inline, completion("A"), request=request(easy)))


@pytest.mark.parametrize(("spec", "fragment"), [
    ({"threshold": 1.5}, "'threshold'"),
    ({"threshold": "high"}, "'threshold'"),
    ({}, "'threshold'"),
    ({"threshold": 0.5, "model_file": "MISSING"}, "model_file"),
    ({"threshold": 0.5}, "exactly one of 'model_file'"),
    ({"threshold": 0.5, "model_file": "MODEL", "model": {}}, "exactly one of 'model_file'"),
    ({"threshold": 0.5, "model": {"format": "other"}}, "format"),
    ({"threshold": 0.5, "model_file": "MODEL", "bias": 1}, "bias"),
])
def test_bad_scorer_specs_name_the_field(spec: dict, fragment: str, fitted: sc.Scorer,
                                         tmp_path: Path) -> None:
    model = tmp_path / "s.json"
    fitted.save(model)
    spec = {k: (str(model) if v == "MODEL" else str(tmp_path / "nope.json")
                if v == "MISSING" else v) for k, v in spec.items()}
    with pytest.raises(ValidatorError, match="scorer") as e:
        build_validators([{"type": "scorer", **spec}])
    assert fragment in str(e.value)


def test_bad_scorer_file_is_refused_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValidatorError, match="broken.json"):
        build_validators([{"type": "scorer", "model_file": str(path), "threshold": 0.5}])
    path.write_text(json.dumps({"format": sc.FORMAT, "dim": 8, "bias": 0.0,
                                "indices": [9], "weights": [1.0]}))
    with pytest.raises(ValidatorError, match="indices"):
        build_validators([{"type": "scorer", "model_file": str(path), "threshold": 0.5}])


def test_config_reads_a_relative_model_file_next_to_itself(fitted: sc.Scorer,
                                                           tmp_path: Path) -> None:
    (tmp_path / "p.scorers").mkdir()
    fitted.save(tmp_path / "p.scorers" / "qa.cheap.json")
    (tmp_path / "p.toml").write_text("""
[providers.sim]
kind = "openai"
base_url = "sim://"

[models.cheap]
provider = "sim"
tier = 1
price = { input_per_mtok = 0.1, output_per_mtok = 0.2 }

[models.big]
provider = "sim"
tier = 2
price = { input_per_mtok = 10.0, output_per_mtok = 30.0 }

[tasks.qa]
ladder = [1, 2]
validators = [SPEC]
""".replace("SPEC", '{ type = "scorer", threshold = 0.5, tiers = [1], '
                    'model_file = "p.scorers/qa.cheap.json" }'))
    cwd = os.getcwd()
    os.chdir("/")  # not relative to where the command runs
    try:
        config = load_config(tmp_path / "p.toml")
    finally:
        os.chdir(cwd)
    spec = config.tasks["qa"].validators[0]
    assert Path(spec["model_file"]) == tmp_path / "p.scorers" / "qa.cheap.json"


def test_job_lines_cannot_name_a_scorer_file() -> None:
    from batchroute.config import parse_config
    from batchroute.jobspec import LineProblem, parse_line

    config = parse_config({
        "providers": {"sim": {"kind": "openai", "base_url": "sim://"}},
        "models": {"m": {"provider": "sim", "tier": 1,
                         "price": {"input_per_mtok": 1.0, "output_per_mtok": 1.0}}},
        "tasks": {"default": {"ladder": [1]}}})
    line = {"custom_id": "x", "body": {"model": "auto",
                                       "messages": [{"role": "user", "content": "hi"}]},
            "batchroute": {"validators": [{"type": "scorer", "threshold": 0.5,
                                           "model_file": "/etc/passwd"}]}}
    with pytest.raises(LineProblem, match="routing config"):
        parse_line(json.dumps(line), 1, config)


def test_fitting_without_scikit_learn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchroute import calibrate as cal

    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)  # import fails
    with pytest.raises(cal.CalibrationError, match=r"batchroute\[calibrate\]"):
        cal.ScorerBank(5)
    # Applying a fitted scorer needs none of it.
    s = sc.Scorer({sc.features("q", "a").popitem()[0]: 1.0}, 0.0)
    assert 0.5 <= s.score("q", "a") < 1.0
