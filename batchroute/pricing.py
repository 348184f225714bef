"""Prices: what one call cost, from the provider's reported usage.

Prices come from the `genai-prices` package (kept current by its maintainers),
overridable per model in the config. A model whose price cannot be found is a
config error at load time, never a silent $0: a zero-cost model would always
win routing and make every savings figure a lie.
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING

from batchroute.completion import Usage

if TYPE_CHECKING:
    from batchroute.config import Config, ModelConfig, Price

_MTOK = Decimal(1_000_000)


def _explicit_cost(price: Price, usage: Usage) -> Decimal:
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    cached_rate = price.cached_input_per_mtok
    if cached_rate is None:
        cached_rate = price.input_per_mtok
    return (
        Decimal(str(price.input_per_mtok)) * (usage.prompt_tokens - cached)
        + Decimal(str(cached_rate)) * cached
        + Decimal(str(price.output_per_mtok)) * usage.completion_tokens
    ) / _MTOK


@lru_cache(maxsize=4096)
def _lookup_cost(model_ref: str, provider_id: str | None, prompt: int, cached: int,
                 completion: int) -> Decimal:
    # Imported here: genai-prices (and the HTTP client it brings) costs ~70 ms to import,
    # paid by every `submit` and worker start, while configs that price their models
    # explicitly never look a price up.
    from genai_prices import Usage as PriceUsage
    from genai_prices import calc_price

    usage = PriceUsage(input_tokens=prompt, output_tokens=completion,
                       cache_read_tokens=min(cached, prompt) or None)
    if provider_id:
        return calc_price(usage, model_ref=model_ref, provider_id=provider_id).total_price
    return calc_price(usage, model_ref=model_ref).total_price


def model_cost(model: ModelConfig, usage: Usage) -> float:
    """USD for one call of a catalog model (cached input priced as such)."""
    if model.price is not None:
        return float(_explicit_cost(model.price, usage))
    return float(_lookup_cost(model.price_ref or model.api_model, model.price_provider,
                              usage.prompt_tokens, usage.cached_tokens,
                              usage.completion_tokens))


def reference_cost(config: Config, model_name: str, usage: Usage) -> float | None:
    """What the same tokens would have cost on `model_name` (the savings baseline).

    A catalog name uses the catalog's price; any other real model name is looked
    up in genai-prices; None when nobody knows its price.
    """
    model = config.models.get(model_name)
    if model is not None:
        return model_cost(model, usage)
    try:
        return float(_lookup_cost(model_name, None, usage.prompt_tokens, usage.cached_tokens,
                                  usage.completion_tokens))
    except LookupError:
        return None


def check_prices(config: Config) -> None:
    """Every catalog model must have a price; raise ConfigError naming the first that has none."""
    from batchroute.config import ConfigError

    for model in config.models.values():
        if model.price is not None:
            continue
        try:
            model_cost(model, Usage(prompt_tokens=1000, completion_tokens=1000))
        except LookupError as e:
            ref = model.price_ref or model.api_model
            raise ConfigError(
                f"models.{model.name}: no known price for {ref!r} in genai-prices ({e}); "
                f"set models.{model.name}.price = {{ input_per_mtok = ..., output_per_mtok = ... }}"
                f" or price_ref to a known model"
            ) from e
