"""Round trip of one 10,000-request provider batch per API through the simulator (#18).

Builds the request file (``provider_batch.formats``), submits, polls and fetches results
with ``provider_batch.client`` over real HTTP, and parses them back by custom_id. It shows
that the simulated Files + Batches and Message Batches APIs and the client handle a batch
of the size #18's benchmark needs in seconds (batch requests skip per-request latency).

    python benchmarks/provider_batch_roundtrip.py [N]
"""

from __future__ import annotations

import sys
import time

import httpx

from batchroute.provider_batch import client as bc
from batchroute.provider_batch import formats
from batchroute.sim import SimBatch, SimConfig, SimModel, SimServer


def main(n: int) -> None:
    config = SimConfig(models={"good": SimModel(latency_ms=100)}, seed=1,
                       batch=SimBatch(delay_s=0.5))
    with SimServer(config) as sim, httpx.Client() as http:
        for api in ("openai", "anthropic"):
            requests = [(f"j{i}", "good", {"max_tokens": 30, "messages": [
                {"role": "user", "content": f"Say the number {i}."}]}) for i in range(n)]
            started = time.perf_counter()
            client: bc.BatchClient
            if api == "openai":
                client = bc.OpenAIBatchClient(http, f"{sim.url}/v1", "k", timeout_s=30)
                content = formats.openai_input_file(requests)
            else:
                client = bc.AnthropicBatchClient(http, f"{sim.url}/v1", "k", timeout_s=30)
                content = formats.anthropic_create_body(requests)
            status = bc.wait(client, client.submit(content), deadline_s=300, interval_s=0.1)
            parsed = bc.parse(client, client.results(status), [r[0] for r in requests])
            ok = sum(1 for item in parsed.items.values() if item.state == "succeeded")
            print(f"{api}: {len(content) / 1e6:.1f} MB, {status.status}, succeeded {ok}/{n}, "
                  f"unmapped lines {len(parsed.problems)}, "
                  f"{time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
