"""Everything a worker process holds for its lifetime: config, store, HTTP client, dispatcher.

Built once per process (Celery worker or embedded run) and passed to the
pipeline, so the pipeline itself holds no globals and tests can build one with
any parts they like.
"""

from __future__ import annotations

import ssl
import threading
from typing import Any

import httpx
import structlog

from batchroute.adaptive import Cascade
from batchroute.breaker import Breakers, MemoryBreakers
from batchroute.budget import BudgetBackend, BudgetGuard, MemoryBudgets
from batchroute.config import Config, ProviderConfig, load_config
from batchroute.dispatch import Dispatcher
from batchroute.ratelimit import Limiter, MemoryBackend
from batchroute.store import Store

log = structlog.get_logger("batchroute.runtime")


class Runtime:
    def __init__(self, config: Config, store: Store, dispatcher: Dispatcher,
                 client: httpx.Client | None = None, breakers: Breakers | None = None,
                 limiter: Limiter | None = None, budgets: BudgetBackend | None = None) -> None:
        self.config = config
        # In-process breakers unless the caller shares some (Redis) across workers.
        self.breakers: Breakers = breakers or MemoryBreakers(config.breaker)
        self.budget = BudgetGuard(config.budget, budgets or MemoryBudgets(),
                                  store.batch_budget, store.spent_usd)
        # Rate-limit pools: in-process unless the caller shares them (Redis) across workers.
        self.limiter = limiter or Limiter(config, MemoryBackend())
        self.store = store
        # Ledger statistics for the adaptive cascade, cached per process (batchroute.adaptive).
        self.cascade = Cascade(config, store)
        self.dispatcher = dispatcher
        self._shared_client = client
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._ssl: ssl.SSLContext | None = None
        self._sim: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> httpx.Client:
        """The HTTP client for this thread's calls: the one given, else one per thread.

        Why per thread: httpcore's pool scans all its connections under one lock for every
        request and every response closed, so one client shared by 32 busy threads spent
        a fifth of a zero-latency attempt there. A thread makes one call at a time, so its
        own pool stays a connection or two per provider."""
        if self._shared_client is not None:
            return self._shared_client
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            with self._lock:
                if self._ssl is None:  # loading the CA bundle costs ~30 ms: once, shared
                    self._ssl = httpx.create_ssl_context()
                client = httpx.Client(verify=self._ssl, limits=httpx.Limits(
                    max_connections=64, max_keepalive_connections=8))
                self._clients.append(client)
            self._local.client = client
        return client

    @classmethod
    def from_env(cls, dispatcher: Dispatcher, config: Config | None = None) -> Runtime:
        return cls(config or load_config(), Store(), dispatcher)

    def base_url(self, provider: ProviderConfig) -> str:
        """The provider's URL; "sim://" starts the built-in simulator in this process once."""
        if not provider.simulated:
            return provider.base_url
        with self._lock:
            if self._sim is None:
                from batchroute.sim import SimConfig, SimServer

                self._sim = SimServer(SimConfig.from_dict(self.config.simulator)).start()
                log.info("simulator_started", url=self._sim.url)
            return f"{self._sim.url}/v1"

    def close(self) -> None:
        if self._shared_client is not None:
            self._shared_client.close()
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
        if self._sim is not None:
            self._sim.stop()
            self._sim = None
