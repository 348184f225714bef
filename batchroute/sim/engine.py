"""The protocol-neutral core of the simulator: limits, fault injection, answers, stats.

Kept apart from the HTTP layer so the OpenAI and Anthropic endpoints are guaranteed to
behave identically apart from their wire format: a fault or an answer can never depend
on which API a client happened to speak.
"""

from __future__ import annotations

import copy
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import structlog

from batchroute.replay import ReplayFormatError, ReplayIndex
from batchroute.sim import replay as sim_replay
from batchroute.sim import tokens
from batchroute.sim.answers import Answer, generate_answer, logprobs_for
from batchroute.sim.config import SimBatch, SimConfig, SimConfigError, SimModel
from batchroute.sim.limits import Decision, Limit, RateLimiter

log = structlog.get_logger(__name__)

FAULT_KINDS = ("timeout", "malformed", "empty", "content_filter", "length")
_DRAWS_PER_CALL = 7


@dataclass(frozen=True)
class ChatRequest:
    """A chat request after protocol parsing; ``messages`` hold plain-text content."""

    model: str
    messages: list[dict[str, str]]
    response_format: Any = None
    max_tokens: int | None = None
    logprobs: bool = False
    stop: tuple[str, ...] = ()
    n: int = 1  # choices asked for (OpenAI ``n``)


@dataclass(frozen=True)
class Success:
    content: str
    finish_reason: str  # "stop" | "length" | "content_filter" | "stop_sequence"
    prompt_tokens: int
    completion_tokens: int
    stop_sequence: str | None = None
    logprobs: list[tuple[str, bytes, float]] | None = None
    malformed: bool = False
    limits: Decision | None = None
    alternatives: tuple[str, ...] = ()  # contents of choices 1..n-1
    # Time from the rate limiter's count to the reply, as OpenAI's openai-processing-ms
    # reports it: the request was counted at least this long before the reply left.
    processing_ms: int | None = None


@dataclass(frozen=True)
class Failure:
    status: int
    kind: str  # "rate_limit" | "context_length" | "server_error" | "overloaded" | "injected"
    message: str
    retry_after_s: float | None = None
    limit_type: str | None = None  # "requests" | "tokens" for rate limits
    limits: Decision | None = None


Outcome = Success | Failure


def _new_stats() -> dict[str, Any]:
    return {
        "requests": 0,
        "by_model": Counter(),
        "by_status": Counter(),
        "by_endpoint": Counter(),
        "refused_rpm": 0,
        "refused_tpm": 0,
        "faults": Counter({kind: 0 for kind in FAULT_KINDS}),
        "answers": Counter({"good": 0, "bad": 0}),
        "truncated_max_tokens": 0,
        "tokens": Counter({"prompt": 0, "completion": 0}),
    }


class SimEngine:
    """Shared state of one simulated provider; every method is thread-safe."""

    def __init__(self, config: SimConfig) -> None:
        # A private copy: two servers built from one config must not reconfigure each other.
        self.config = copy.deepcopy(config)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.limiter = RateLimiter(window_s=self.config.window_s)
        self._faults = random.Random(self.config.seed)
        self._stats = _new_stats()
        self.replay: ReplayIndex | None = None
        if self.config.replay:
            try:
                self.replay = ReplayIndex.load(self.config.replay)
            except (OSError, ReplayFormatError) as e:
                raise SimConfigError(f"simulator.replay: cannot load {self.config.replay!r}: "
                                     f"{e}") from e

    # --- control ---------------------------------------------------------------------

    def set_model(self, name: str, model: SimModel) -> None:
        with self.lock:
            self.config.models[name] = copy.deepcopy(model)

    def set_default(self, model: SimModel) -> None:
        with self.lock:
            self.config.default = copy.deepcopy(model)

    def set_batch(self, settings: SimBatch) -> None:
        with self.lock:
            self.config.batch = copy.deepcopy(settings)

    def config_dict(self) -> dict[str, Any]:
        with self.lock:
            return self.config.to_dict()

    def reset(self) -> None:
        """Zero the counters, empty the rate-limit windows and re-seed the fault RNG, so a
        test that resets starts from the same state as a freshly started sim."""
        with self.lock:
            self._stats = _new_stats()
            self.limiter.reset()
            self._faults = random.Random(self.config.seed)

    def stats(self) -> dict[str, Any]:
        """A JSON-ready snapshot (status codes are string keys, as they are over HTTP)."""
        with self.lock:
            return {
                key: {str(k): v for k, v in value.items()} if isinstance(value, Counter)
                else value
                for key, value in self._stats.items()
            }

    def count_request(self, endpoint: str, model: str | None) -> None:
        with self.lock:
            self._stats["requests"] += 1
            self._stats["by_endpoint"][endpoint] += 1
            if model is not None:
                self._stats["by_model"][model] += 1

    def count_response(self, status: int) -> None:
        with self.lock:
            self._stats["by_status"][str(status)] += 1

    def wait(self, seconds: float) -> None:
        """Sleep, but wake up when the server stops, so stop() never waits for a hang."""
        if seconds > 0:
            self.stopping.wait(seconds)

    # --- the request path ------------------------------------------------------------

    def complete(self, req: ChatRequest, batch: bool = False) -> Outcome:
        """One chat completion. ``batch=True`` is for a provider batch request: real
        providers count batch work against separate (batch queue) limits, not the
        synchronous rpm/tpm, and a batch's timing is its ``delay_s`` as a whole, so there
        is no rate limit, per-request latency or hang (a 10,000-request batch would
        otherwise take 10,000 latencies); answers, usage and other faults are the same."""
        if self.replay is not None:
            return self._replay(req, batch)
        with self.lock:
            model = self.config.model(req.model)
            limits = [
                Limit("*", self.config.rpm, self.config.tpm),
                Limit(f"model:{req.model}", model.rpm, model.tpm),
            ]
        prompt_tokens = tokens.count_messages(req.messages)
        if prompt_tokens > model.context_window:
            return Failure(400, "context_length",
                           f"This model's maximum context length is {model.context_window} "
                           f"tokens. However, your messages resulted in {prompt_tokens} tokens.")
        answer = generate_answer(req.model, req.messages, req.response_format, model.fail_rate,
                                 model.fail_rates)
        # Reserve what the provider would: the prompt plus max_tokens, else the real answer.
        reserve = prompt_tokens + (
            req.max_tokens if req.max_tokens is not None else tokens.count_text(answer.content)
        )
        with self.lock:
            decision = (Decision(allowed=True) if batch
                        else self.limiter.acquire(limits, reserve))
            counted = time.monotonic()
            if not decision.allowed:
                self._stats[f"refused_{decision.refused_by}"] += 1
            draws = [self._faults.random() for _ in range(_DRAWS_PER_CALL)]
        if not decision.allowed:
            kind = "tokens" if decision.refused_by == "tpm" else "requests"
            message = (
                f"Request too large: {reserve} tokens exceed the limit of tokens per minute"
                if decision.too_large
                else f"Rate limit reached for {kind} per minute (simulated). "
                     f"Please try again in {decision.retry_after_s:.3f}s."
            )
            return Failure(429, "rate_limit", message, retry_after_s=decision.retry_after_s,
                           limit_type=kind, limits=decision)
        outcome = self._serve(req, model, answer, prompt_tokens, draws, decision, batch)
        if req.n > 1 and isinstance(outcome, Success):
            # Further samples: the same prompt under another seed, so each sample is good
            # or bad independently, as sampling a real model at temperature > 0 is.
            extra = tuple(generate_answer(f"{req.model}\0sample{i}", req.messages,
                                          req.response_format, model.fail_rate,
                                          model.fail_rates).content
                          for i in range(1, req.n))
            outcome = replace(outcome, alternatives=extra, completion_tokens=(
                outcome.completion_tokens + sum(tokens.count_text(x) for x in extra)))
        if isinstance(outcome, Success) and not batch:  # rounded down: never overstated
            outcome = replace(outcome, processing_ms=int((time.monotonic() - counted) * 1000))
        return outcome

    def _replay(self, req: ChatRequest, batch: bool = False) -> Outcome:
        """Serve the recorded answer and usage as recorded: latency applies, injected faults
        and rate limits do not (they exercise other code and would perturb the figures a
        replay exists to measure)."""
        assert self.replay is not None
        found = sim_replay.lookup(self.replay, req.model, req.messages, req.n)
        if isinstance(found, sim_replay.ReplayMiss):
            return Failure(found.status, "replay_miss", found.message)
        with self.lock:
            model = self.config.model(req.model)
        if not batch:
            self.wait(max(0.0, model.latency_ms) / 1000)
        with self.lock:
            self._stats["answers"]["replayed"] += 1
            self._stats["tokens"]["prompt"] += found.prompt_tokens
            self._stats["tokens"]["completion"] += found.completion_tokens
        return Success(content=found.contents[0], finish_reason="stop",
                       prompt_tokens=found.prompt_tokens,
                       completion_tokens=found.completion_tokens,
                       alternatives=found.contents[1:])

    def _serve(self, req: ChatRequest, model: SimModel, answer: Answer, prompt_tokens: int,
               draws: list[float], decision: Decision, batch: bool = False) -> Outcome:
        u_timeout, u_jitter, u_error, u_malformed, u_empty, u_filter, u_length = draws
        limits = decision if decision.requests or decision.tokens else None
        if u_timeout < model.timeout_rate:
            self._fault("timeout")
            if not batch:
                self.wait(model.hang_s)
        jitter = (2 * u_jitter - 1) * model.latency_jitter_ms
        if not batch:
            self.wait(max(0.0, model.latency_ms + jitter) / 1000)

        cumulative = 0.0
        for code in sorted(model.error_rates):
            cumulative += model.error_rates[code]
            if u_error < cumulative:
                self._fault(f"error_{code}")
                return _injected_error(code, model, limits)

        content, finish = answer.content, "stop"
        stop_sequence = None
        served_answer = True
        malformed = u_malformed < model.malformed_rate
        if malformed:
            self._fault("malformed")
        elif u_empty < model.empty_rate:
            self._fault("empty")
            content, served_answer = "", False
        elif u_filter < model.content_filter_rate:
            self._fault("content_filter")
            content, finish, served_answer = "", "content_filter", False
        elif u_length < model.length_rate:
            self._fault("length")
            content = tokens.truncate(content, tokens.count_text(content) // 2)
            finish = "length"

        if req.stop and finish == "stop":
            hits = [(content.find(s), s) for s in req.stop if s and s in content]
            if hits:
                index, stop_sequence = min(hits)
                content, finish = content[:index], "stop_sequence"
        if req.max_tokens is not None and tokens.count_text(content) > req.max_tokens:
            content, finish = tokens.truncate(content, req.max_tokens), "length"
            with self.lock:
                self._stats["truncated_max_tokens"] += 1

        completion_tokens = tokens.count_text(content)
        logprobs = None
        if req.logprobs:
            pieces = tokens.token_pieces(content)
            values = logprobs_for(answer, len(pieces), model.fail_rate)
            logprobs = [(text, raw, lp) for (text, raw), lp in zip(pieces, values, strict=True)]
        with self.lock:
            if served_answer:
                self._stats["answers"]["bad" if answer.bad else "good"] += 1
            self._stats["tokens"]["prompt"] += prompt_tokens
            self._stats["tokens"]["completion"] += completion_tokens
        return Success(content=content, finish_reason=finish, prompt_tokens=prompt_tokens,
                       completion_tokens=completion_tokens, stop_sequence=stop_sequence,
                       logprobs=logprobs, malformed=malformed, limits=limits)

    def _fault(self, kind: str) -> None:
        with self.lock:
            self._stats["faults"][kind] += 1


_ERROR_MESSAGES = {
    429: ("rate_limit", "Rate limit reached (simulated overload). Please retry later."),
    500: ("server_error", "The server had an error while processing your request (simulated)."),
    502: ("server_error", "Bad gateway (simulated)."),
    503: ("overloaded", "The engine is currently overloaded, please try again later "
                        "(simulated)."),
    529: ("overloaded", "Overloaded (simulated)."),
}


def _injected_error(code: int, model: SimModel, limits: Decision | None) -> Failure:
    kind, message = _ERROR_MESSAGES.get(code, ("injected", f"Simulated HTTP {code} error."))
    return Failure(code, kind, message,
                   retry_after_s=model.retry_after_s if code == 429 else None,
                   limit_type="requests" if code == 429 else None, limits=limits)
