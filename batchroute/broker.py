"""Celery settings shared by the worker app (`workers/`) and by the library's publishers.

One place, so the submitting side and the consuming side can never disagree on
serialisation or reliability settings.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
TASK_NAME = "batchroute.process_job"


def broker_url() -> str:
    return os.environ.get("BATCHROUTE_BROKER_URL") or DEFAULT_BROKER_URL


def celery_settings() -> dict[str, Any]:
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
        "worker_prefetch_multiplier": 4,
        # I/O-bound calls: threads, many of them, not one process per call.
        "worker_pool": "threads",
        "worker_concurrency": int(os.environ.get("BATCHROUTE_WORKER_CONCURRENCY", "32")),
        "broker_transport_options": {"visibility_timeout": 3600},
        "broker_connection_retry_on_startup": True,
        "task_time_limit": 900,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_default_queue": "batchroute.default",
    }


def make_celery(name: str = "batchroute") -> Celery:
    app = Celery(name)
    app.conf.update(celery_settings())
    return app
