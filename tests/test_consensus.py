"""The consensus check: votes over the n choices of one completion, and its plumbing."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from batchroute import consensus
from batchroute.completion import Completion, Usage
from batchroute.config import ProviderConfig
from batchroute.providers import call
from batchroute.sim import SimConfig, SimModel, SimServer
from batchroute.validators import (
    ValidatorError,
    build_validators,
    specs_for_tier,
    validate_specs,
)


def completion(*contents: str) -> Completion:
    body = {"object": "chat.completion", "choices": [
        {"index": i, "message": {"role": "assistant", "content": c}, "finish_reason": "stop"}
        for i, c in enumerate(contents)]}
    return Completion(content=contents[0], finish_reason="stop", usage=Usage(10, 5),
                      model="m", alternatives=tuple(contents[1:]), body=body)


def check(spec: dict[str, Any], *contents: str) -> Any:
    (validator,) = build_validators([spec])
    return validator.check(completion(*contents))


def test_answer_key_strips_decoration_and_case() -> None:
    assert consensus.answer_key("Answer: **B**.") == "b"
    assert consensus.answer_key("  The answer is 05/01/2021. ") == "05/01/2021"
    assert consensus.answer_key("Answers vary") == "answers vary"
    assert consensus.answer_key("Paris", case_sensitive=True) == "Paris"
    assert consensus.answer_key("   ") == ""


def test_extract_takes_the_last_match() -> None:
    text = "First 12 apples, then 3 more.\n#### 15"
    assert consensus.answer_key(text, extract=r"####\s*(\d+)") == "15"
    assert consensus.answer_key("so 3, no wait, 4", extract=r"\d+") == "4"
    assert consensus.answer_key("no number", extract=r"\d+") == ""


def test_tally_counts_normalised_answers_and_breaks_ties_by_first_seen() -> None:
    t = consensus.tally(["Paris", "paris.", "Lyon", "", "Lyon"])
    assert (t.answer, t.votes, t.index, t.distinct) == ("paris", 2, 0, 2)
    assert consensus.tally(["", " "]).answer == ""


def test_consensus_accepts_when_enough_samples_agree() -> None:
    spec = {"type": "consensus", "k": 5, "min_agree": 3}
    ok = check(spec, "Paris", "Paris.", "Lyon", "paris", "Nice")
    assert ok.ok and ok.score == pytest.approx(0.6) and "3/5" in ok.reason
    bad = check(spec, "Paris", "Lyon", "Nice", "Paris", "Lille")
    assert not bad.ok
    assert bad.reason == "consensus: 2/5 samples agree on 'paris', 3 needed"
    # Only the first k samples count.
    assert not check({"type": "consensus", "k": 3, "min_agree": 3}, "a", "a", "b", "a").ok


def test_consensus_fails_when_the_provider_returned_fewer_samples() -> None:
    v = check({"type": "consensus", "k": 3}, "Paris")
    assert not v.ok and "only 1 of 3 samples" in v.reason


def test_consensus_default_is_a_strict_majority_and_extract_applies() -> None:
    spec = {"type": "consensus", "k": 4, "extract": r"####\s*(\d+)"}
    assert check(spec, "x #### 7", "y #### 7", "#### 7", "#### 8").ok
    assert not check(spec, "x #### 7", "y #### 7", "#### 9", "#### 8").ok


@pytest.mark.parametrize(("spec", "message"), [
    ({"type": "consensus"}, "'k' (samples to compare) must be an integer >= 2"),
    ({"type": "consensus", "k": 1}, "must be an integer >= 2"),
    ({"type": "consensus", "k": 3, "min_agree": 4}, "cannot exceed 'k'"),
    ({"type": "consensus", "k": 3, "extract": "("}, "'extract' is not a valid regular"),
    ({"type": "consensus", "k": 3, "extract": "(a)(b)"}, "at most one group"),
    ({"type": "consensus", "k": 3, "n": 3}, "unknown parameter 'n'"),
    ({"type": "json", "tiers": []}, "'tiers' must be a non-empty list"),
    ({"type": "json", "tiers": [0]}, "'tiers' must be a non-empty list"),
])
def test_spec_errors(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidatorError, match=re.escape(message)):
        validate_specs([spec])


def test_specs_for_tier_keeps_unrestricted_and_matching_specs() -> None:
    specs: list[dict[str, Any]] = [{"type": "non_empty"},
                                   {"type": "consensus", "k": 3, "tiers": [1]},
                                   {"type": "json", "tiers": [2, 3]}]
    assert specs_for_tier(specs, 1) == [{"type": "non_empty"}, {"type": "consensus", "k": 3}]
    assert specs_for_tier(specs, 3) == [{"type": "non_empty"}, {"type": "json"}]
    validate_specs(specs)  # "tiers" is accepted on any spec


def test_with_samples_raises_n_to_the_largest_k_and_never_lowers_it() -> None:
    body: dict[str, Any] = {"messages": []}
    specs = [{"type": "consensus", "k": 3}, {"type": "consensus", "k": 5}]
    assert consensus.with_samples(body, specs)["n"] == 5
    assert consensus.with_samples({**body, "n": 8}, specs)["n"] == 8
    assert consensus.with_samples(body, [{"type": "json"}]) is body


def test_majority_first_moves_an_agreeing_sample_to_the_front() -> None:
    c = completion("Lyon", "Paris", "paris", "Nice")
    moved = consensus.majority_first(c, [{"type": "consensus", "k": 4}])
    assert moved.content == "Paris"
    assert moved.alternatives == ("Lyon", "paris", "Nice")
    choices = moved.body["choices"]
    assert [x["message"]["content"] for x in choices] == ["Paris", "Lyon", "paris", "Nice"]
    assert [x["index"] for x in choices] == [0, 1, 2, 3]
    same = completion("Paris", "Paris", "Lyon")
    assert consensus.majority_first(same, [{"type": "consensus", "k": 3}]) is same


def test_the_simulator_and_adapter_carry_n_samples_end_to_end() -> None:
    # Outside replay mode each extra sample is drawn independently, so a model that is
    # bad half the time disagrees with itself, as a sampled real model does.
    provider = ProviderConfig(name="sim", kind="openai", base_url="sim://")
    config = SimConfig(models={"m": SimModel(fail_rate=0.5)}, seed=3)
    body = {"messages": [{"role": "user", "content": "Is the sky blue? Answer with exactly "
                                                     "one of: yes, no."}], "n": 6}
    with SimServer(config) as sim, httpx.Client() as client:
        got = call(client, provider, f"{sim.url}/v1", "m", body)
        one = call(client, provider, f"{sim.url}/v1", "m", {**body, "n": 1})
    assert len(got.alternatives) == 5
    assert got.content == one.content  # choice 0 is what a plain call answers
    assert len(set(consensus.samples_of(got))) > 1
    assert got.usage.completion_tokens > one.usage.completion_tokens
