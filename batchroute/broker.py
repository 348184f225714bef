"""Celery settings shared by the worker app (`workers/`) and by the library's publishers.

One place, so the submitting side and the consuming side can never disagree on
serialisation or reliability settings. The reasoning behind each reliability
setting is in the README ("Reliability"); the short version: the SQL store is
the truth, so the broker only has to be *eventually* right, and every setting
here is chosen so that a duplicate message is harmless and a lost one is found.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from batchroute.store import lease_seconds

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
TASK_NAME = "batchroute.process_job"
CHUNK_TASK = "batchroute.process_jobs"
SWEEP_TASK = "batchroute.sweep"
SWEEP_QUEUE = "batchroute.sweep"
# Beat's provider-batch tick (batchroute.provider_batch.runner), on the sweep queue.
PROVIDER_BATCH_TASK = "batchroute.provider_batches"

# Hard limit < claim lease (960 s, store.DEFAULT_LEASE_S) < visibility timeout: a live
# attempt is never taken over by the sweeper, and Redis never redelivers the message of a
# task that is still allowed to run.
DEFAULT_TIME_LIMIT_S = 900.0
DEFAULT_VISIBILITY_TIMEOUT_S = 3600.0
DEFAULT_SWEEP_INTERVAL_S = 60.0
DEFAULT_PROVIDER_BATCH_TICK_S = 10.0


class BrokerSettingsError(ValueError):
    """Reliability settings that contradict each other; the message says which."""


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise BrokerSettingsError(f"{name}={value!r}: expected a number of seconds") from None
    if seconds <= 0:
        raise BrokerSettingsError(f"{name}={value!r}: must be positive")
    return seconds


def sweep_interval_s() -> float:
    """How often beat runs the sweeper (BATCHROUTE_SWEEP_INTERVAL_S, default 60 s)."""
    return _env_seconds("BATCHROUTE_SWEEP_INTERVAL_S", DEFAULT_SWEEP_INTERVAL_S)


def provider_batch_tick_s() -> float:
    """How often beat runs the provider-batch tick (BATCHROUTE_PROVIDER_BATCH_TICK_S,
    default 10 s; each provider batch is still polled only every `poll_s`)."""
    return _env_seconds("BATCHROUTE_PROVIDER_BATCH_TICK_S", DEFAULT_PROVIDER_BATCH_TICK_S)


def reliability_timeouts() -> tuple[float, float, float]:
    """(hard time limit, claim lease, visibility timeout), checked against each other."""
    limit = _env_seconds("BATCHROUTE_TASK_TIME_LIMIT_S", DEFAULT_TIME_LIMIT_S)
    visibility = _env_seconds("BATCHROUTE_VISIBILITY_TIMEOUT_S", DEFAULT_VISIBILITY_TIMEOUT_S)
    lease = lease_seconds()
    if not limit < lease:
        raise BrokerSettingsError(
            f"task time limit ({limit:g} s) must be shorter than the claim lease "
            f"BATCHROUTE_LEASE_S ({lease:g} s), or the sweeper takes jobs from live attempts")
    if not limit < visibility:
        raise BrokerSettingsError(
            f"task time limit ({limit:g} s) must be shorter than the broker visibility timeout "
            f"BATCHROUTE_VISIBILITY_TIMEOUT_S ({visibility:g} s), or Redis redelivers tasks "
            "that are still running")
    return limit, lease, visibility


def broker_url() -> str:
    return os.environ.get("BATCHROUTE_BROKER_URL") or DEFAULT_BROKER_URL


def celery_settings() -> dict[str, Any]:
    time_limit, _lease, visibility = reliability_timeouts()
    interval = sweep_interval_s()
    tick = provider_batch_tick_s()
    task_events = os.environ.get("BATCHROUTE_TASK_EVENTS", "1").strip().lower() not in (
        "0", "false", "no", "off")
    return {
        "broker_url": broker_url(),
        # JSON only: a message claiming pickle is refused, so the broker cannot be a code channel.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,  # results live in the SQL store
        # A job is acked after it ran: a killed worker's job is redelivered, and the
        # claim-by-attempt-number in the store makes the redelivery harmless.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A crashed attempt's message is acked, not redelivered in a loop: the store still
        # says queued/running and the sweeper moves the job on (bounded by max lost runs).
        "task_acks_on_failure_or_timeout": True,
        # One message per pool slot: calls take seconds, so a worker that reserved more would
        # sit on jobs other workers could run now (and lose more of them if it is killed).
        "worker_prefetch_multiplier": 1,
        # I/O-bound calls: threads, many of them, not one process per call.
        "worker_pool": "threads",
        "worker_concurrency": int(os.environ.get("BATCHROUTE_WORKER_CONCURRENCY", "32")),
        "broker_transport_options": {"visibility_timeout": visibility},
        "broker_connection_retry_on_startup": True,
        # Ride out a broker restart of any length instead of exiting after 100 tries.
        "broker_connection_max_retries": None,
        # In-flight calls finish and write to the store when the broker connection drops.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Enforced by the prefork/gevent pools; with the default threads pool the provider's
        # HTTP timeout bounds a call and the claim lease bounds a stuck or dead worker.
        "task_time_limit": time_limit,
        # The sweeper (batchroute.recovery): `celery -A workers beat` runs it on this schedule.
        "beat_schedule": {
            "batchroute-sweep": {"task": SWEEP_TASK, "schedule": interval,
                                 "options": {"queue": SWEEP_QUEUE, "expires": interval}},
            "batchroute-provider-batches": {
                "task": PROVIDER_BATCH_TASK, "schedule": tick,
                "options": {"queue": SWEEP_QUEUE, "expires": tick}},
        },
        # Task events feed Flower's task list. They cost broker round trips per task on the
        # worker's one event-loop thread (measured: ~30% less throughput with 16 threads on
        # a busy 2-core host); BATCHROUTE_TASK_EVENTS=0 turns them off, and Flower then
        # switches them on while it watches (its --enable_events default, every few seconds).
        "worker_send_task_events": task_events,
        "task_send_sent_event": task_events,
        # ... and are published in batches every 50 ms, not one round trip each
        # (batchroute.worker_events).
        "worker_consumer": "batchroute.worker_events:EventBatchingConsumer",
        "task_default_queue": "batchroute.default",
    }


def broker_eviction_problem(url: str | None = None) -> str | None:
    """Why the broker may lose messages under memory pressure, or None if it will not.

    A Redis that evicts keys drops queued messages silently (the sweeper would find them,
    but only after the stale threshold). Returns None as well when the policy cannot be
    read (not Redis, or CONFIG disabled as on some managed services): nothing to report.
    """
    url = url or broker_url()
    if not url.startswith(("redis://", "rediss://")):
        return None
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.RedisError:
        return None
    if policy in (None, "noeviction"):
        return None
    return (f"Redis maxmemory-policy is {policy!r}: under memory pressure it evicts queued "
            "messages; set maxmemory-policy noeviction (docker-compose.yml does)")


def make_celery(name: str = "batchroute") -> Celery:
    app = Celery(name)
    app.conf.update(celery_settings())
    return app
