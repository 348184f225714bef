"""Prometheus metrics: queue depth per pool, jobs by state, rate-limit pool usage.

Flower shows workers and tasks but exports no queue depth, and queue depth per provider
pool is the number an operator scales workers on (`docker compose up --scale ...`). So
`batchroute metrics --port 9808` serves /metrics in the Prometheus text format, read
fresh on every scrape (no background polling, nothing cached between scrapes):

* ``batchroute_queue_messages{queue}``: messages waiting in each queue (LLEN of the Redis
  list, plus kombu's priority lists), for every provider pool and the sweeper's queue;
* ``batchroute_queue_jobs{queue}``: jobs waiting for each queue, as the store counts them
  (a message may carry up to 16 jobs, so this, not the message count, is the work
  waiting; it includes jobs waiting out a retry delay);
* ``batchroute_queue_unacked_messages``: messages delivered to workers and not yet acked
  (running, or reserved by a worker's prefetch);
* ``batchroute_jobs{state}`` over the whole store, and ``batchroute_batch_jobs{batch_id,
  state}`` for the batches that still have queued or running jobs (finished batches drop
  out, so labels do not grow without bound);
* ``batchroute_pool_*{pool}``: each rate-limit pool's use in its current window against its
  limits, shared by all workers (from `batchroute.ratelimit.pool_status`);
* ``batchroute_up{part}``: 1 when the broker / store / rate-limit pools could be read, else
  0 (a scrape never fails as a whole because one part is down).

Only counts and names leave this module: never job bodies, never secrets.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import click
import structlog
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from batchroute.broker import SWEEP_QUEUE, broker_url
from batchroute.config import Config, load_config

log = structlog.get_logger("batchroute.metrics")

PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: "<queue>\x06\x16<priority>"
PRIORITY_STEPS = (3, 6, 9)  # priority 0 is the queue's own list
DEFAULT_PORT = 9808


def queues(config: Config) -> list[str]:
    """Every queue batchroute publishes to: one per provider pool, and the sweeper's."""
    return sorted({p.queue for p in config.providers.values()} | {SWEEP_QUEUE})


def queue_depths(client: Any, names: list[str], prefix: str = "") -> tuple[dict[str, int], int]:
    """(messages waiting per queue, messages delivered and not acked), in one round trip."""
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            for key in (name, *(f"{name}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS)):
                pipe.llen(prefix + key)
        pipe.hlen(prefix + "unacked")
        replies = pipe.execute()
    per = 1 + len(PRIORITY_STEPS)
    depths = {name: sum(int(n) for n in replies[i * per:(i + 1) * per])
              for i, name in enumerate(names)}
    return depths, int(replies[-1])


class BatchrouteCollector(Collector):
    """Reads the broker, the store and the rate-limit pools at scrape time."""

    def __init__(self, config: Config, store: Any | None = None,
                 redis_client: Any | None = None) -> None:
        self.config = config
        self._store = store
        self._redis = redis_client

    def _client(self) -> Any:
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(broker_url(), socket_connect_timeout=5,
                                               socket_timeout=10)
        return self._redis

    def store(self) -> Any:
        if self._store is None:
            from batchroute.store import Store

            self._store = Store()
        return self._store

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("batchroute_up", "1 if this part could be read in this scrape",
                               labels=["part"])
        yield from self._queues(up)
        yield from self._jobs(up)
        yield from self._pools(up)
        yield up

    def _queues(self, up: GaugeMetricFamily) -> Iterator[Metric]:
        try:
            depths, unacked = queue_depths(self._client(), queues(self.config))
        except Exception as e:  # redis.RedisError, or a broker that is not Redis
            log.warning("metrics_broker_unreadable", error=str(e))
            up.add_metric(["broker"], 0)
            return
        up.add_metric(["broker"], 1)
        g = GaugeMetricFamily("batchroute_queue_messages",
                              "Messages waiting in the queue (one queue per provider pool)",
                              labels=["queue"])
        for name, n in depths.items():
            g.add_metric([name], n)
        yield g
        yield GaugeMetricFamily("batchroute_queue_unacked_messages",
                                "Messages delivered to workers and not yet acknowledged",
                                value=unacked)

    def _jobs(self, up: GaugeMetricFamily) -> Iterator[Metric]:
        try:
            store = self.store()
            totals, per_batch = store.job_counts()
            waiting = store.queued_by_provider()
        except Exception as e:  # the database is down or unreachable
            log.warning("metrics_store_unreadable", error=str(e))
            up.add_metric(["store"], 0)
            return
        up.add_metric(["store"], 1)
        g = GaugeMetricFamily("batchroute_jobs", "Jobs in the store by state", labels=["state"])
        for state, n in sorted(totals.items()):
            g.add_metric([state], n)
        yield g
        per_queue = dict.fromkeys(queues(self.config), 0)
        for provider, n in waiting.items():
            if provider in self.config.providers:  # a provider since removed has no queue
                per_queue[self.config.providers[provider].queue] += n
        q = GaugeMetricFamily("batchroute_queue_jobs",
                              "Jobs waiting for each queue, as the store counts them (a "
                              "message may carry several)", labels=["queue"])
        for queue, n in sorted(per_queue.items()):
            q.add_metric([queue], n)
        yield q
        b = GaugeMetricFamily("batchroute_batch_jobs",
                              "Jobs by state of each batch that still has queued or running jobs",
                              labels=["batch_id", "state"])
        for batch_id, state, n in sorted(per_batch):
            b.add_metric([batch_id, state], n)
        yield b

    def _pools(self, up: GaugeMetricFamily) -> Iterator[Metric]:
        from batchroute.ratelimit import pool_status

        rows, problem = pool_status(self.config)
        up.add_metric(["ratelimit"], 0 if problem else 1)
        if problem:
            log.warning("metrics_pools_unreadable", error=problem)
        gauges = {key: GaugeMetricFamily(f"batchroute_pool_{name}", doc, labels=["pool"])
                  for key, name, doc in (
                      ("requests", "requests", "Requests admitted in the pool's window"),
                      ("rpm", "requests_limit", "The pool's requests per window"),
                      ("tokens", "tokens", "Tokens reserved or charged in the pool's window"),
                      ("tpm", "tokens_limit", "The pool's tokens per window"),
                      ("in_flight", "in_flight", "Calls in flight in the pool"),
                      ("max_concurrency", "concurrency_limit", "The pool's concurrency limit"),
                      ("deferred", "deferred", "Jobs put back for capacity in the window"),
                      ("blocked_s", "blocked_seconds",
                       "Seconds the provider still blocks the pool"),
                      ("window_s", "window_seconds", "Length of the pool's window"))}
        for row in rows:
            for key, gauge in gauges.items():
                if row.get(key) is not None:  # a limit the pool does not have is left out
                    gauge.add_metric([row["pool"]], float(row[key]))
        yield from gauges.values()


def registry(config: Config, store: Any | None = None,
             redis_client: Any | None = None) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(BatchrouteCollector(config, store, redis_client))
    return reg


def render(config: Config, store: Any | None = None, redis_client: Any | None = None) -> str:
    """One scrape, as the text /metrics serves."""
    from prometheus_client import generate_latest

    return generate_latest(registry(config, store, redis_client)).decode()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 in a container).")
@click.option("--port", default=DEFAULT_PORT, show_default=True)
@click.option("--once", is_flag=True, help="Print one scrape to stdout and exit.")
@click.pass_obj
def metrics(obj: Any, host: str, port: int, once: bool) -> None:
    """Serve Prometheus metrics on http://HOST:PORT/metrics: queue depth per provider pool,
    jobs by state (per active batch), rate-limit pool usage. Reads $BATCHROUTE_BROKER_URL
    and $BATCHROUTE_DATABASE_URL like the workers."""
    from prometheus_client import start_http_server

    config = obj.config if obj is not None and hasattr(obj, "config") else load_config()
    if once:
        click.echo(render(config), nl=False)
        return
    start_http_server(port, addr=host, registry=registry(config))
    click.echo(f"metrics on http://{host}:{port}/metrics (Ctrl-C to stop)", err=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return
