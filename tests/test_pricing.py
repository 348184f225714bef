from __future__ import annotations

import pytest

from batchroute.completion import Usage
from batchroute.config import ModelConfig, Price, load_config
from batchroute.pricing import model_cost, reference_cost


def test_explicit_price_with_cached_input() -> None:
    m = ModelConfig(name="m", provider="p", api_model="m", tier=1,
                    price=Price(input_per_mtok=2.0, output_per_mtok=8.0, cached_input_per_mtok=0.5))
    cost = model_cost(m, Usage(prompt_tokens=1_000_000, completion_tokens=500_000,
                               cached_tokens=400_000))
    assert cost == pytest.approx(0.6 * 2.0 + 0.4 * 0.5 + 0.5 * 8.0)


def test_genai_prices_lookup_matches_published_price() -> None:
    m = ModelConfig(name="x", provider="p", api_model="x", tier=1, price_ref="gpt-4o",
                    price_provider="openai")
    # gpt-4o: $2.50 in, $10 out per million tokens.
    assert model_cost(m, Usage(1_000_000, 1_000_000)) == pytest.approx(12.5)


def test_reference_cost_for_catalog_real_and_unknown_models() -> None:
    config = load_config()
    u = Usage(1000, 100)
    assert reference_cost(config, "sim-large", u) == pytest.approx(0.0025 + 0.001)
    assert reference_cost(config, "gpt-4o-mini", u) == pytest.approx(0.00015 + 0.00006)
    assert reference_cost(config, "no-such-model-zz", u) is None
