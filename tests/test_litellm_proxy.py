"""LiteLLM's proxy as a real third-party upstream, for the OpenAI and the Anthropic adapter.

The proxy (``litellm --config X --port P``, the ``litellm[proxy]`` package) is started once
for the module. Its models are LiteLLM's own mocks (``mock_response``: a reply, a
``litellm.ContextWindowExceededError``, a ``litellm.RateLimitError``) and, for 429s with
real headers, the project's simulator behind it: LiteLLM forwards the upstream's headers
prefixed ``llm_provider-``, so the wait arrives as ``llm_provider-retry-after(-ms)``.

What is checked, through the real pipeline: usage recorded from the proxy's replies, its
context-window error (HTTP 400, ``litellm.ContextWindowExceededError``) moving the job up
the ladder instead of failing it, and its 429s waited out with its own headers.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchroute.breaker import MemoryBreakers
from batchroute.client import Client
from batchroute.config import Config, parse_config
from batchroute.dispatch import LocalDispatcher
from batchroute.pipeline import process_job
from batchroute.providers import ErrorKind, ProviderError, call
from batchroute.runtime import Runtime
from batchroute.sim import SimConfig, SimModel, SimServer
from batchroute.store import Store

if importlib.util.find_spec("litellm") is None or importlib.util.find_spec("fastapi") is None:
    pytest.skip("needs litellm[proxy] (the dev extra)", allow_module_level=True)

KEY_ENV = "BR_TEST_LITELLM_KEY"
PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
RETRY_AFTER_S = 1.3
MOCK_TEXT = "The capital of France is Paris."
PROXY_CONFIG = """\
model_list:
  - model_name: small
    litellm_params: {{model: openai/small, api_key: sk-upstream, mock_response: "{text}"}}
  - model_name: ctx
    litellm_params:
      model: openai/ctx
      api_key: sk-upstream
      mock_response: litellm.ContextWindowExceededError
  - model_name: rl
    litellm_params:
      {{model: openai/rl, api_key: sk-upstream, mock_response: litellm.RateLimitError}}
  - model_name: limited
    litellm_params: {{model: openai/limited, api_key: sk-upstream, api_base: "{sim}/v1"}}
  - model_name: limited-anth
    litellm_params: {{model: anthropic/limited, api_key: sk-upstream, api_base: "{sim}"}}
litellm_settings:
  num_retries: 0
router_settings:
  num_retries: 0
  disable_cooldowns: true
"""


@dataclass
class Proxy:
    url: str
    key: str
    sim: SimServer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _litellm_cli() -> list[str]:
    exe = Path(sys.executable).parent / "litellm"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "from litellm.proxy.proxy_cli import run_server; run_server()"]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    sim = SimServer(SimConfig(models={}, default=SimModel(), seed=7)).start()
    workdir = tmp_path_factory.mktemp("litellm")
    (workdir / "config.yaml").write_text(PROXY_CONFIG.format(text=MOCK_TEXT, sim=sim.url))
    port, key = _free_port(), f"sk-test-{secrets.token_hex(16)}"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LITELLM_MASTER_KEY")}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_MASTER_KEY=key,
               LITELLM_TELEMETRY="False", NO_DOCS="True")
    log_path = workdir / "proxy.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*_litellm_cli(), "--config", "config.yaml", "--host", "127.0.0.1",
             "--port", str(port)], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"litellm proxy exited ({proc.returncode}):\n"
                            f"{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health/liveliness", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"litellm proxy not up in 90 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield Proxy(url, key, sim)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        sim.stop()


@pytest.fixture
def upstream(proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> Proxy:
    monkeypatch.setenv(KEY_ENV, proxy.key)
    proxy.sim.set_model("limited", SimModel())
    proxy.sim.reset()
    return proxy


def make_config(proxy: Proxy, kind: str, tier1: str, tier2: str = "small") -> Config:
    """Two tiers behind the proxy, spoken to by the adapter ``kind``."""
    return parse_config({
        "providers": {"litellm": {"kind": kind, "base_url": f"{proxy.url}/v1",
                                  "api_key_env": KEY_ENV, "timeout_s": 10, "max_retries": 2}},
        "models": {
            "m1": {"provider": "litellm", "model": tier1, "tier": 1, "price": PRICE},
            "m2": {"provider": "litellm", "model": tier2, "tier": 2, "price": PRICE,
                   "context_window": 1_000_000},
        },
        "tasks": {"default": {"ladder": [1, 2], "validators": [{"type": "non_empty"}]}},
    })


class Harness:
    """Runtime + in-process dispatcher (the code a Celery worker runs) + Client."""

    def __init__(self, config: Config) -> None:
        self.store = Store()
        self.dispatcher = LocalDispatcher(concurrency=4)
        self.rt = Runtime(config, self.store, self.dispatcher,
                          breakers=MemoryBreakers(config.breaker))
        self.dispatcher.handler = lambda j, n: process_job(self.rt, j, n)
        self.client = Client(config, self.store, self.dispatcher, batch="litellm")

    def run_one(self, timeout: float = 30, **body: Any) -> str:
        job_id = self.client.enqueue(
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            **body).job_id
        assert self.dispatcher.join(timeout), "the job did not finish"
        assert not self.dispatcher.errors, self.dispatcher.errors
        return job_id

    def close(self) -> None:
        self.dispatcher.close()
        self.rt.close()


@pytest.fixture
def harness_for(upstream: Proxy) -> Iterator[Any]:
    made: list[Harness] = []

    def make(kind: str, tier1: str, tier2: str = "small") -> Harness:
        made.append(Harness(make_config(upstream, kind, tier1, tier2)))
        return made[-1]

    yield make
    for h in made:
        h.close()


def proxy_call(proxy: Proxy, kind: str, api_model: str) -> Any:
    config = make_config(proxy, kind, api_model)
    p = config.providers["litellm"]
    with httpx.Client() as client:
        return call(client, p, p.base_url, api_model,
                    {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 16})


ADAPTERS = ["openai", "anthropic"]


@pytest.mark.parametrize("kind", ADAPTERS)
def test_usage_is_recorded_from_the_proxy(harness_for: Any, kind: str) -> None:
    h = harness_for(kind, "small")
    # LiteLLM's mock answers its Anthropic route with a fixed usage (2,095 prompt tokens for
    # this 14-token prompt): the call's reservation must cover it, or billing clamps the
    # cost at COST_CLAMP_FACTOR x the reservation (what tests/test_hostile_replies.py checks).
    job = h.store.get_job(h.run_one(max_tokens=2048))
    assert job is not None and job.state == "succeeded" and job.model == "m1", job
    assert job.result is not None
    assert job.result["choices"][0]["message"]["content"] == MOCK_TEXT
    (attempt,) = h.store.job_attempts(job.id)
    assert attempt.flags is None
    usage = job.result["usage"]
    assert attempt.prompt_tokens == usage["prompt_tokens"] > 0
    assert attempt.completion_tokens == usage["completion_tokens"] > 0
    assert attempt.cost_usd == pytest.approx(
        (attempt.prompt_tokens * 1.0 + attempt.completion_tokens * 2.0) / 1e6)


@pytest.mark.parametrize("kind", ADAPTERS)
def test_context_window_error_escalates_to_the_larger_model(harness_for: Any, upstream: Proxy,
                                                            kind: str) -> None:
    with pytest.raises(ProviderError) as e:
        proxy_call(upstream, kind, "ctx")
    assert e.value.kind is ErrorKind.CONTEXT_LENGTH and e.value.status == 400
    assert "ContextWindowExceededError" in e.value.message

    h = harness_for(kind, "ctx")
    job = h.store.get_job(h.run_one())
    assert job is not None and job.state == "succeeded", job.error
    assert job.model == "m2" and job.tier == 2
    attempts = h.store.job_attempts(job.id)
    # One call on the small window, no retry of the same overflow, then the larger model.
    assert [(a.model, a.error_kind) for a in attempts] == [
        ("m1", "context_length_exceeded"), ("m2", None)]


@pytest.mark.parametrize(("kind", "model"), [("openai", "rl"), ("anthropic", "rl"),
                                             ("openai", "limited"),
                                             ("anthropic", "limited-anth")])
def test_proxy_429s_are_rate_limits(upstream: Proxy, kind: str, model: str) -> None:
    upstream.sim.set_model("limited", SimModel(error_rates={429: 1.0},
                                               retry_after_s=RETRY_AFTER_S))
    with pytest.raises(ProviderError) as e:
        proxy_call(upstream, kind, model)
    assert e.value.kind is ErrorKind.RATE_LIMITED and e.value.status == 429, e.value
    if (kind, model) == ("openai", "limited"):
        # The upstream's Retry-After, which the proxy forwards only as llm_provider-*.
        assert e.value.retry_after == pytest.approx(RETRY_AFTER_S)


def test_llm_provider_retry_after_is_honoured(harness_for: Any, upstream: Proxy) -> None:
    """A 429 through the proxy is waited out for the upstream's Retry-After (1.3 s, read
    from ``llm_provider-retry-after-ms``), then the same model answers."""
    sim = upstream.sim
    sim.set_model("limited", SimModel(error_rates={429: 1.0}, retry_after_s=RETRY_AFTER_S))

    def heal() -> None:  # the limit lifts once one 429 has been served
        deadline = time.monotonic() + 10
        while sim.stats()["by_status"].get("429", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        sim.set_model("limited", SimModel())

    healer = threading.Thread(target=heal)
    healer.start()
    h = harness_for("openai", "limited")
    job_id = h.run_one()
    healer.join()
    job = h.store.get_job(job_id)
    assert job is not None and job.state == "succeeded" and job.model == "m1", job.error
    attempts = h.store.job_attempts(job_id)
    assert [(a.model, a.error_kind) for a in attempts] == [("m1", "rate_limited"), ("m1", None)]
    gap = (attempts[1].created_at - attempts[0].created_at).total_seconds()
    assert gap >= RETRY_AFTER_S - 0.1, gap
    # Usage of the simulator's reply, through the proxy, recorded on the second attempt.
    assert attempts[1].prompt_tokens == sim.stats()["tokens"]["prompt"] > 0
