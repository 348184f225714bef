"""Routing configuration: providers, the model catalog, task profiles.

Loaded from TOML once per process and then treated as immutable, so routing
decisions are reproducible: the same config and the same job always give the
same ladder. Every problem is reported with the TOML path that caused it,
because a config error found at load time is far cheaper than one found after
thousands of paid calls.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from batchroute.breaker import BreakerConfig
from batchroute.budget import BudgetConfig
from batchroute.cascade import CascadeConfig, CascadeConfigError
from batchroute.provider_batch.settings import ProviderBatchConfig, ProviderBatchConfigError
from batchroute.reuse import ReuseConfig, ReuseConfigError

T = TypeVar("T")

DEFAULT_CONFIG_NAME = "default.toml"
SIM_BASE_URL = "sim://"
"""A provider base_url meaning "the built-in simulator, started in this process"."""


class ConfigError(ValueError):
    """The routing config is unusable; the message names the TOML path."""


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    kind: str  # "openai" (any OpenAI-compatible API) or "anthropic"
    base_url: str
    api_key_env: str = ""
    timeout_s: float = 60.0
    max_retries: int = 2
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    # The window rpm/tpm are counted over: 60 s at real providers; shorter only to test
    # against a simulator whose [simulator] window_s is shorter (batchroute.ratelimit).
    rate_window_s: float = 60.0
    # The pools count a call until its reply came back (it reached the provider by then:
    # strict), pacing at limit / (window + latency); a call slower than this counts at
    # admission + this instead (20 s replies on a 60 s window would pace 25% slow), at the
    # risk of a 429 when a request reaches the provider later than this. None: the
    # default, 2 s (batchroute.ratelimit); a large value (3600) counts every call until
    # its reply, strict whatever the delays.
    rate_safety_s: float | None = None
    # A reply is read streamed and ends `reply_too_large` past this many (decoded) bytes.
    max_reply_bytes: int = 16 * 1024 * 1024
    # The whole call (connect, headers, body) ends `deadline_exceeded` after timeout_s times
    # this: timeout_s alone bounds each read, and a body trickled byte by byte never trips it.
    deadline_factor: float = 3.0
    # Send this provider's jobs through its batch API (OpenAI Files + Batches, Anthropic
    # Message Batches) when their batch allows it (batchroute.provider_batch), at
    # `batch_discount` times the synchronous price where genai-prices has no batch price.
    batch: bool = False
    batch_discount: float = 0.5

    @property
    def deadline_s(self) -> float:
        """The total time one call may take (batchroute.providers.deadline)."""
        return self.timeout_s * self.deadline_factor

    @property
    def queue(self) -> str:
        """One broker queue per provider pool, so a throttled provider never stalls others."""
        return f"batchroute.{self.name}"

    @property
    def simulated(self) -> bool:
        return self.base_url.startswith("sim:")


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None = None


@dataclass(frozen=True)
class ModelConfig:
    name: str  # catalog key, what jobs and reports call the model
    provider: str
    api_model: str  # what is sent to the provider's API
    tier: int
    price: Price | None = None  # explicit override; otherwise genai-prices
    price_ref: str | None = None  # model id to look up in genai-prices
    price_provider: str | None = None  # genai-prices provider id
    context_window: int = 128_000
    # Limits of this model alone, enforced on top of its provider's (batchroute.ratelimit).
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    # Overrides its provider's `batch` for this model alone (None: the provider's).
    batch: bool | None = None


@dataclass(frozen=True)
class LengthRule:
    """Start long or keyword-flagged prompts at a higher tier: cheap models fail them."""

    start_tier: int
    min_prompt_tokens: int | None = None
    keywords: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskProfile:
    name: str
    ladder: tuple[int, ...]
    validators: tuple[dict[str, Any], ...] = ()
    rules: tuple[LengthRule, ...] = ()


@dataclass(frozen=True)
class Config:
    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig]
    tasks: dict[str, TaskProfile]
    custom_validators: dict[str, str] = field(default_factory=dict)
    simulator: dict[str, Any] = field(default_factory=dict)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    reuse: ReuseConfig = field(default_factory=ReuseConfig)
    provider_batch: ProviderBatchConfig = field(default_factory=ProviderBatchConfig)
    source: str = "<default>"

    def task(self, name: str | None) -> TaskProfile:
        return self.tasks.get(name or "default") or self.tasks["default"]

    def models_at(self, tier: int) -> list[ModelConfig]:
        """Models of one tier, in config order: the first is preferred, the rest are failovers."""
        return [m for m in self.models.values() if m.tier == tier]

    @property
    def tiers(self) -> list[int]:
        return sorted({m.tier for m in self.models.values()})

    def provider_of(self, model: ModelConfig) -> ProviderConfig:
        return self.providers[model.provider]

    def uses_batch_api(self, model: ModelConfig) -> bool:
        """Whether calls to this model may go through its provider's batch API."""
        return model.batch if model.batch is not None else self.providers[model.provider].batch


def _get(table: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str,
         default: Any = ..., ) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigError(f"{where}.{key}: required")
        return default
    value = table[key]
    if not isinstance(value, typ) or (isinstance(value, bool) and bool not in _as_tuple(typ)):
        names = "/".join(t.__name__ for t in _as_tuple(typ))
        raise ConfigError(f"{where}.{key}: expected {names}, got {value!r}")
    return value


def _as_tuple(typ: type | tuple[type, ...]) -> tuple[type, ...]:
    return typ if isinstance(typ, tuple) else (typ,)


def _parse_provider(name: str, t: dict[str, Any]) -> ProviderConfig:
    where = f"providers.{name}"
    kind = _get(t, "kind", str, where, "openai")
    if kind not in ("openai", "anthropic"):
        raise ConfigError(f"{where}.kind: must be 'openai' or 'anthropic', got {kind!r}")
    return ProviderConfig(
        name=name,
        kind=kind,
        base_url=_get(t, "base_url", str, where).rstrip("/"),
        api_key_env=_get(t, "api_key_env", str, where, ""),
        timeout_s=float(_get(t, "timeout_s", (int, float), where, 60.0)),
        max_retries=_get(t, "max_retries", int, where, 2),
        rpm=_limit(t, "rpm", where),
        tpm=_limit(t, "tpm", where),
        max_concurrency=_limit(t, "max_concurrency", where),
        rate_window_s=_positive(t, "rate_window_s", where, 60.0),
        rate_safety_s=_non_negative(t, "rate_safety_s", where),
        max_reply_bytes=int(_positive(t, "max_reply_bytes", where, 16 * 1024 * 1024)),
        deadline_factor=_positive(t, "deadline_factor", where, 3.0),
        batch=_get(t, "batch", bool, where, False),
        batch_discount=_fraction(t, "batch_discount", where, 0.5),
    )


def _fraction(t: dict[str, Any], key: str, where: str, default: float) -> float:
    value = float(_get(t, key, (int, float), where, default))
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where}.{key}: must be between 0 and 1, got {value:g}")
    return value


def _positive(t: dict[str, Any], key: str, where: str, default: float) -> float:
    value = float(_get(t, key, (int, float), where, default))
    if value <= 0:
        raise ConfigError(f"{where}.{key}: must be > 0, got {value:g}")
    return value


def _non_negative(t: dict[str, Any], key: str, where: str) -> float | None:
    value = _get(t, key, (int, float), where, None)
    if value is None:
        return None
    if value < 0:
        raise ConfigError(f"{where}.{key}: must be >= 0, got {value:g}")
    return float(value)


def _limit(t: dict[str, Any], key: str, where: str) -> int | None:
    """An optional positive limit (rpm, tpm, max_concurrency): 0 would stop the pool forever."""
    value = _get(t, key, int, where, None)
    if value is not None and value < 1:
        raise ConfigError(f"{where}.{key}: must be >= 1 (omit it for no limit), got {value}")
    return value


def _parse_price(where: str, t: dict[str, Any]) -> Price:
    return Price(
        input_per_mtok=float(_get(t, "input_per_mtok", (int, float), where)),
        output_per_mtok=float(_get(t, "output_per_mtok", (int, float), where)),
        cached_input_per_mtok=(
            float(t["cached_input_per_mtok"]) if "cached_input_per_mtok" in t else None
        ),
    )


def _parse_model(name: str, t: dict[str, Any], providers: dict[str, ProviderConfig]) -> ModelConfig:
    where = f"models.{name}"
    provider = _get(t, "provider", str, where)
    if provider not in providers:
        raise ConfigError(f"{where}.provider: unknown provider {provider!r} "
                          f"(known: {', '.join(providers) or 'none'})")
    tier = _get(t, "tier", int, where)
    if tier < 1:
        raise ConfigError(f"{where}.tier: must be >= 1, got {tier}")
    price_t = _get(t, "price", dict, where, None)
    return ModelConfig(
        name=name,
        provider=provider,
        api_model=_get(t, "model", str, where, name),
        tier=tier,
        price=_parse_price(f"{where}.price", price_t) if price_t is not None else None,
        price_ref=_get(t, "price_ref", str, where, None),
        price_provider=_get(t, "price_provider", str, where, None),
        context_window=_get(t, "context_window", int, where, 128_000),
        rpm=_limit(t, "rpm", where),
        tpm=_limit(t, "tpm", where),
        max_concurrency=_limit(t, "max_concurrency", where),
        batch=_get(t, "batch", bool, where, None),
    )


def _parse_task(name: str, t: dict[str, Any], tiers: list[int],
                custom: dict[str, str]) -> TaskProfile:
    where = f"tasks.{name}"
    ladder = _get(t, "ladder", list, where, tiers)
    for tier in ladder:
        if tier not in tiers:
            raise ConfigError(f"{where}.ladder: no model has tier {tier!r} (tiers: {tiers})")
    if list(ladder) != sorted(set(ladder)):
        raise ConfigError(f"{where}.ladder: must be strictly increasing, got {ladder}")
    rules = []
    for i, r in enumerate(_get(t, "rules", list, where, [])):
        rw = f"{where}.rules[{i}]"
        start = _get(r, "start_tier", int, rw)
        if start not in ladder:
            raise ConfigError(f"{rw}.start_tier: {start} is not on the ladder {ladder}")
        rules.append(LengthRule(
            start_tier=start,
            min_prompt_tokens=_get(r, "min_prompt_tokens", int, rw, None),
            keywords=tuple(k.lower() for k in _get(r, "keywords", list, rw, [])),
        ))
    validators = _get(t, "validators", list, where, [])
    from batchroute.validators import ValidatorError, validate_specs

    try:
        validate_specs(validators, custom)
    except ValidatorError as e:
        raise ConfigError(f"{where}.{e}") from e
    return TaskProfile(name=name, ladder=tuple(ladder), validators=tuple(validators),
                       rules=tuple(rules))


def _parse_cascade(t: Any) -> CascadeConfig:
    return _parse_table("cascade", t, CascadeConfig.from_dict, CascadeConfigError)


def _parse_reuse(t: Any) -> ReuseConfig:
    return _parse_table("reuse", t, ReuseConfig.from_dict, ReuseConfigError)


def _parse_table(name: str, t: Any, from_dict: Callable[[dict[str, Any]], T],
                 error: type[Exception]) -> T:
    """A section owned by another module: its own errors become ConfigError."""
    if not isinstance(t, dict):
        raise ConfigError(f"{name}: expected a table, got {t!r}")
    try:
        return from_dict(t)
    except error as e:
        raise ConfigError(str(e)) from e


def parse_config(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Build a Config from parsed TOML, checking every cross-reference."""
    providers = {n: _parse_provider(n, t) for n, t in data.get("providers", {}).items()}
    if not providers:
        raise ConfigError(f"{source}: [providers] is empty: configure at least one provider")
    models = {n: _parse_model(n, t, providers) for n, t in data.get("models", {}).items()}
    if not models:
        raise ConfigError(f"{source}: [models] is empty: configure at least one model")
    tiers = sorted({m.tier for m in models.values()})
    custom = {str(k): str(v) for k, v in data.get("custom_validators", {}).items()}
    tasks = {n: _parse_task(n, t, tiers, custom) for n, t in data.get("tasks", {}).items()}
    tasks.setdefault("default", TaskProfile(name="default", ladder=tuple(tiers)))
    config = Config(
        providers=providers,
        models=models,
        tasks=tasks,
        custom_validators=custom,
        simulator=dict(data.get("simulator", {})),
        breaker=BreakerConfig.from_dict(data.get("breaker", {})),
        budget=BudgetConfig.from_dict(data.get("budget", {})),
        cascade=_parse_cascade(data.get("cascade", {})),
        reuse=_parse_reuse(data.get("reuse", {})),
        provider_batch=_parse_table("provider_batch", data.get("provider_batch", {}),
                                    ProviderBatchConfig.from_dict, ProviderBatchConfigError),
        source=source,
    )
    from batchroute.pricing import check_prices

    check_prices(config)
    return config


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the routing config: a path, else $BATCHROUTE_CONFIG, else the packaged default."""
    path = path or os.environ.get("BATCHROUTE_CONFIG") or None
    if path is None:
        text = resources.files("batchroute").joinpath(DEFAULT_CONFIG_NAME).read_text("utf-8")
        source = "<built-in default config>"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} "
                              "(set BATCHROUTE_CONFIG or pass --config)")
        text = p.read_text("utf-8")
        source = str(p)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from e
    if path is not None:
        _anchor_replay_path(data, Path(path).resolve().parent)
        _anchor_scorer_paths(data, Path(path).resolve().parent)
    return parse_config(data, source)


def _anchor_scorer_paths(data: dict[str, Any], base: Path) -> None:
    """A relative ``model_file`` of a ``scorer`` check means "next to this config file":
    ``batchroute calibrate`` writes the scorer weights beside the policy it writes."""
    tasks = data.get("tasks")
    for task in tasks.values() if isinstance(tasks, dict) else ():
        specs = task.get("validators") if isinstance(task, dict) else None
        for spec in specs if isinstance(specs, list) else ():
            ref = spec.get("model_file") if isinstance(spec, dict) else None
            if isinstance(spec, dict) and spec.get("type") == "scorer" and \
                    isinstance(ref, str) and ref and not Path(ref).is_absolute():
                spec["model_file"] = str(base / ref)


def _anchor_replay_path(data: dict[str, Any], base: Path) -> None:
    """A relative ``[simulator] replay`` path means "next to this config file", so a
    config and its replay file can be moved (or committed) together."""
    sim = data.get("simulator")
    replay = sim.get("replay") if isinstance(sim, dict) else None
    if isinstance(sim, dict) and isinstance(replay, str) and replay and \
            not Path(replay).is_absolute():
        sim["replay"] = str(base / replay)


def check_api_keys(config: Config, providers: list[str] | None = None) -> None:
    """Fail before any job is taken when a provider's key variable is unset."""
    missing = [
        f"{p.api_key_env} (provider {p.name!r})"
        for p in config.providers.values()
        if p.api_key_env and (providers is None or p.name in providers)
        and not (os.environ.get(p.api_key_env) or "").strip()  # blank is missing
    ]
    if missing:
        raise ConfigError("missing API key environment variable(s): " + ", ".join(missing)
                          + "; export them or remove those providers from the config")
