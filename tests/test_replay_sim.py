"""The simulator's replay mode over real HTTP: recorded answers, recorded usage, clear misses."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from batchroute.config import load_config
from batchroute.replay import ReplayFormatError, load_records
from batchroute.sim import SimConfig, SimConfigError, SimServer

DATA = Path(__file__).parent / "data"
TINY = DATA / "replay_tiny.jsonl"
FRANCE = "What is the capital of France? Answer with the city name only."


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SimConfig(replay=str(TINY))) as server:
        yield server


def chat(sim: SimServer, model: str, content: object, **extra: object) -> httpx.Response:
    return httpx.post(f"{sim.url}/v1/chat/completions", timeout=10, json={
        "model": model, "messages": [{"role": "user", "content": content}], **extra})


def test_known_prompt_gets_the_recorded_answer_and_usage(sim: SimServer) -> None:
    r = chat(sim, "big", FRANCE)
    assert r.status_code == 200
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "Paris"
    assert body["usage"] == {"prompt_tokens": 22, "completion_tokens": 4, "total_tokens": 26}
    assert body["model"] == "big"
    # Content parts are the same prompt.
    parts = chat(sim, "big", [{"type": "text", "text": FRANCE}])
    assert parts.json()["choices"][0]["message"]["content"] == "Paris"


def test_each_model_gets_its_own_recorded_answer(sim: SimServer) -> None:
    record = next(r for r in load_records(TINY) if r.id == "tr-03")
    prompt = record.messages[0]["content"]
    for model, response in record.responses.items():
        got = chat(sim, model, prompt).json()
        assert got["choices"][0]["message"]["content"] == response.content
        assert got["usage"]["completion_tokens"] == response.completion_tokens


def test_anthropic_endpoint_replays_too(sim: SimServer) -> None:
    r = httpx.post(f"{sim.url}/v1/messages", timeout=10,
                   headers={"anthropic-version": "2023-06-01", "x-api-key": "k"},
                   json={"model": "mid", "max_tokens": 50,
                         "messages": [{"role": "user", "content": FRANCE}]})
    assert r.status_code == 200
    assert r.json()["content"][0]["text"] == "Paris"
    assert r.json()["usage"] == {"input_tokens": 20, "output_tokens": 3}


def test_unknown_prompt_is_a_clear_404_naming_model_and_prompt(sim: SimServer) -> None:
    r = chat(sim, "big", "What is the capital of Atlantis? Answer with the city name only.")
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "replay_miss"
    assert "'big'" in error["message"]
    assert "What is the capital of Atlantis?" in error["message"]


def test_unknown_model_for_a_known_prompt_lists_the_recorded_models(sim: SimServer) -> None:
    r = chat(sim, "gpt-9", FRANCE)
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    assert "'gpt-9'" in message and "big, cheap, mid" in message


def test_n_returns_the_recorded_samples_in_order_and_bills_them_all(sim: SimServer) -> None:
    record = next(r for r in load_records(TINY) if r.id == "tr-03")
    samples = record.responses["cheap"].samples
    r = chat(sim, "cheap", record.messages[0]["content"], n=4)
    assert r.status_code == 200
    body = r.json()
    assert [c["message"]["content"] for c in body["choices"]] == [s.content for s in samples[:4]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 20  # the prompt is billed once
    assert body["usage"]["completion_tokens"] == sum(s.completion_tokens for s in samples[:4])


def test_more_samples_than_recorded_is_a_400(sim: SimServer) -> None:
    r = chat(sim, "big", FRANCE, n=2)
    assert r.status_code == 400
    assert "only 1 recorded sample" in r.json()["error"]["message"]
    bad = chat(sim, "big", FRANCE, n=0)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"


def test_replay_path_problems_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(SimConfigError, match="simulator.replay: cannot load"):
        SimServer(SimConfig(replay=str(tmp_path / "missing.jsonl")))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"id": "x", "messages": [], "responses": {}}) + "\n")
    with pytest.raises(SimConfigError, match="messages"):
        SimServer(SimConfig(replay=str(broken)))
    with pytest.raises(ReplayFormatError, match=r"broken.jsonl:1"):
        load_records(broken)
    with pytest.raises(SimConfigError, match="simulator.replay"):
        SimConfig.from_dict({"replay": 3})
    assert SimConfig.from_dict({"replay": "x.jsonl"}).replay == "x.jsonl"


def test_a_relative_replay_path_is_read_next_to_the_config_file() -> None:
    config = load_config(DATA / "replay_tiny.toml")
    assert Path(config.simulator["replay"]) == TINY.resolve()
