"""What a batch result costs: the provider's batch price, else the synchronous one discounted.

genai-prices knows batch prices for some models (a ``processing = batch`` price variant,
e.g. Anthropic's, "charged at 50% of the standard rates"); where it does, that price is
used. Elsewhere (explicit config prices, models without a batch variant) the synchronous
price times ``discount`` (config ``batch_discount``, default 0.5: OpenAI's and
Anthropic's published batch discount) is used.
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING

from genai_prices import Usage as PriceUsage
from genai_prices import calc_price

from batchroute.completion import Usage
from batchroute.pricing import model_cost

if TYPE_CHECKING:
    from batchroute.config import ModelConfig

DEFAULT_DISCOUNT = 0.5
#: Attempt flag of a call answered through a provider batch (reports: the batch discount).
BATCH_FLAG = "provider_batch"
_BATCH = {"processing": "batch"}


@lru_cache(maxsize=4096)
def known_batch_cost(model_ref: str, provider_id: str | None, prompt: int, cached: int,
                     completion: int) -> Decimal | None:
    """genai-prices' batch price of these tokens, or None when it has no batch variant
    (its batch lookup then returns the synchronous price, which would charge in full)."""
    usage = PriceUsage(input_tokens=prompt, output_tokens=completion,
                       cache_read_tokens=min(cached, prompt) or None)
    try:
        standard = calc_price(usage, model_ref=model_ref, provider_id=provider_id)
        batch = calc_price(usage, model_ref=model_ref, provider_id=provider_id,
                           price_context=_BATCH)
    except LookupError:
        return None
    if batch.total_price >= standard.total_price and standard.total_price > 0:
        return None
    return batch.total_price


def batch_cost(model: ModelConfig, usage: Usage, discount: float = DEFAULT_DISCOUNT) -> float:
    """USD for one request of a provider batch (see the module docstring for the source)."""
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"batch_discount must be between 0 and 1, got {discount!r}")
    if model.price is None:
        known = known_batch_cost(model.price_ref or model.api_model, model.price_provider,
                                 usage.prompt_tokens, usage.cached_tokens,
                                 usage.completion_tokens)
        if known is not None:
            return float(known)
    return model_cost(model, usage) * discount
