"""Routing decisions: which tiers a job may use, where it starts, which model serves a tier.

Pure functions of (config, job, token count): no I/O, so every rule is unit
tested without servers, and a job routes the same way in `run`, in a Celery
worker and in a test.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from batchroute.config import Config, ModelConfig
from batchroute.jobspec import JobSpec
from batchroute.tokens import max_completion


class RouteError(ValueError):
    """No model can take this job; the message says why and what to change."""


@dataclass(frozen=True)
class Route:
    ladder: tuple[int, ...]
    start_index: int
    reference_model: str | None
    reason: str

    @property
    def start_tier(self) -> int:
        return self.ladder[self.start_index]


def _allowed_models(config: Config, spec: JobSpec) -> list[ModelConfig]:
    models = list(config.models.values())
    if spec.pin:
        models = [m for m in models if spec.pin in (m.name, m.provider)]
    return models


def route(config: Config, spec: JobSpec, prompt_tokens: int) -> Route:
    """The tier ladder for a job and the tier it starts at."""
    profile = config.task(spec.task)
    need = prompt_tokens + max_completion(spec.body)
    models = [m for m in _allowed_models(config, spec) if m.context_window >= need]
    if not models:
        biggest = max((m.context_window for m in _allowed_models(config, spec)), default=0)
        raise RouteError(f"prompt of {prompt_tokens} tokens (+{max_completion(spec.body)} for the "
                         f"answer) exceeds every allowed model's context window (largest "
                         f"{biggest}); shorten or split it")
    tiers = {m.tier for m in models}
    ladder = [t for t in profile.ladder if t in tiers] if not spec.pin else sorted(tiers)
    ref = config.models.get(spec.reference_model or "")
    if ref is not None and not spec.pin:
        # A catalog model named in body.model is the quality reference: never go above it.
        ladder = [t for t in ladder if t <= ref.tier] or [ref.tier]
    if spec.max_tier is not None:
        ladder = [t for t in ladder if t <= spec.max_tier]
    if spec.min_tier is not None:
        ladder = [t for t in ladder if t >= spec.min_tier]
    if not ladder:
        raise RouteError(f"no tier left for task {profile.name!r} between min_tier="
                         f"{spec.min_tier} and max_tier={spec.max_tier} (tiers: {sorted(tiers)})")
    start, reason = ladder[0], f"task {profile.name}: cheapest tier"
    text = " ".join(str(m.get("content", "")) for m in spec.body["messages"]).lower()
    for rule in profile.rules:
        hit = (rule.min_prompt_tokens is not None and prompt_tokens >= rule.min_prompt_tokens) or (
            bool(rule.keywords) and any(k in text for k in rule.keywords))
        if hit and rule.start_tier > start:
            start = rule.start_tier
            long = rule.min_prompt_tokens is not None and prompt_tokens >= rule.min_prompt_tokens
            reason = (f"prompt of {prompt_tokens} tokens >= {rule.min_prompt_tokens}" if long
                      else f"keyword rule {list(rule.keywords)}")
    start_index = next((i for i, t in enumerate(ladder) if t >= start), len(ladder) - 1)
    reference = spec.reference_model or _top_model(config, ladder, spec)
    return Route(ladder=tuple(ladder), start_index=start_index, reference_model=reference,
                 reason=reason)


def _top_model(config: Config, ladder: list[int], spec: JobSpec) -> str | None:
    """With body.model "auto", the baseline is the task's top tier (before job limits)."""
    top = max(config.task(spec.task).ladder)
    models = config.models_at(top)
    return models[0].name if models else None


def pick_model(config: Config, tier: int, pin: str | None = None,
               exclude: Collection[str] = ()) -> ModelConfig | None:
    """The preferred model of a tier; the next ones serve as failovers when some are excluded."""
    for m in config.models_at(tier):
        if pin and pin not in (m.name, m.provider):
            continue
        if m.name in exclude or m.provider in exclude:
            continue
        return m
    return None
