"""A simulated LLM provider: deterministic answer quality, seedable faults, real HTTP.

Tests and the embedded ``sim://`` mode talk to it over httpx exactly as they would to
OpenAI or Anthropic, so the same adapters, retries and rate limiters get exercised::

    with SimServer(SimConfig(models={"sim-small": SimModel(fail_rate=0.3)})) as sim:
        httpx.post(f"{sim.url}/v1/chat/completions", json={...})
"""

from batchroute.sim.config import SimBatch, SimConfig, SimConfigError, SimModel
from batchroute.sim.server import SimServer, serve_forever

__all__ = ["SimBatch", "SimConfig", "SimConfigError", "SimModel", "SimServer", "serve_forever"]
