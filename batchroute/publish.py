"""Publishing many job messages at once: Celery protocol-2 messages pushed in one Redis pipeline.

Why not `send_task` in a loop: each call builds the message through several layers
(routing, signals, a `task-sent` event published on its own round trip) and sends one
LPUSH per message, ~1,300 messages/s here, which makes the broker the slowest stage of
submitting a 100k-line batch. This module builds the same message kombu's Redis transport
would write, fills in the per-message fields, and sends a whole chunk as one pipeline of
multi-value LPUSHes (~100k messages/s).

What makes it a message a worker accepts, checked against Celery 5.x / kombu 5.x:

* the list key is the queue name (plus the transport's ``global_keyprefix``, if any): with
  the anonymous ("") exchange kombu routes to the queue named by the routing key, which is
  what `send_task(queue=...)` does for direct queues;
* the envelope is kombu's: ``body`` (base64 of the JSON body), ``content-type``
  application/json, ``content-encoding`` utf-8, ``headers``, ``properties`` with
  ``body_encoding`` base64, a unique ``delivery_tag``, ``delivery_info``
  {exchange: "", routing_key: queue} (used when an unacked message is restored), priority 0
  (so the base list, not a ``\\x06\\x16<n>`` priority list);
* headers and body are Celery's task protocol 2, taken from ``app.amqp.as_task_v2`` once so
  every header Celery expects is present; only ``id``, ``root_id`` and ``argsrepr`` vary.

LPUSH followed by the worker's BRPOP is FIFO, the same order `send_task` gives. Messages
with a countdown are not published here (they need an ETA): `CeleryDispatcher.enqueue` does.
No ``task-sent`` event is sent, so Flower shows these tasks from "received" on.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery

from batchroute.broker import CHUNK_TASK, TASK_NAME

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_LPUSH_MAX = 1000  # values per LPUSH: keeps any one command (and Redis' reply buffer) small

# Markers replaced per message; they cannot occur in the JSON that surrounds them.
_TID, _ARGSREPR, _BODY, _TAG, _QUEUE = "@@T@@", "@@A@@", "@@B@@", "@@G@@", "@@Q@@"


# Protocol 2 body: (args, kwargs, embed), what `as_task_v2` builds with no callbacks.
_BODY_FORMAT = ('[%s, {}, {"callbacks": null, "errbacks": null, "chain": null, '
                '"chord": null}]')


# A publish is split into at least this many messages per queue before jobs share one: a
# chunk runs its jobs one after the other on one worker thread, so a batch needs many more
# messages than the fleet has threads to keep them all busy to its end.
MIN_MESSAGES = 256


def chunk_size(jobs: int, most: int) -> int:
    """Jobs per message when `jobs` jobs go to one queue at once, at most `most`: 1 (a
    message each) below 2 x MIN_MESSAGES, rising to `most` for large publishes."""
    return max(1, min(most, jobs // MIN_MESSAGES))


def chunks(pairs: Sequence[tuple[str, int]], most: int) -> list[Sequence[tuple[str, int]]]:
    """`pairs` (one queue's jobs) split into the messages `chunk_size` calls for."""
    size = chunk_size(len(pairs), most)
    return [pairs[i:i + size] for i in range(0, len(pairs), size)]


def by_queue(items: Sequence[tuple[str, int, str]]) -> dict[str, list[tuple[str, int]]]:
    """(job id, attempt number, queue) triples as each queue's pairs, in order."""
    out: dict[str, list[tuple[str, int]]] = {}
    for job_id, attempt_no, queue in items:
        out.setdefault(queue, []).append((job_id, attempt_no))
    return out


def _json_str(value: str) -> str:
    """`value` as the inside of a JSON string literal."""
    return json.dumps(value)[1:-1]


class RedisBulkPublisher:
    """Publishes (job id, attempt number, queue) triples to a Redis broker, a chunk per
    pipeline. Thread-safe: the Redis client is a connection pool and the template is
    read-only after construction."""

    def __init__(self, app: Celery, client: Any | None = None,
                 task_name: str = TASK_NAME, chunk_task_name: str = CHUNK_TASK) -> None:
        import redis

        url = str(app.conf.broker_url)
        if not url.startswith(REDIS_SCHEMES):
            raise ValueError(f"not a Redis broker URL: {url.split(':', 1)[0]}://")
        options = app.conf.broker_transport_options or {}
        self.prefix = str(options.get("global_keyprefix") or "")
        self.client = client if client is not None else redis.Redis.from_url(
            url, socket_connect_timeout=10, socket_timeout=60)
        self._parts = self._template(app, task_name)
        self._chunk_parts = self._template(app, chunk_task_name)

    @staticmethod
    def _template(app: Celery, task_name: str) -> list[str]:
        """The message as JSON text, split around the fields that vary per message."""
        msg = app.amqp.as_task_v2(_TID, task_name, args=[], kwargs={}, argsrepr=_ARGSREPR,
                                  kwargsrepr="{}", ignore_result=None)
        headers = dict(msg.headers)
        headers["root_id"] = _TID
        envelope = {
            "body": _BODY,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                "correlation_id": _TID,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": _QUEUE},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": _TAG,
            },
        }
        text = json.dumps(envelope)
        parts: list[str] = []
        pos = 0
        markers = (_TID, _ARGSREPR, _BODY, _TAG, _QUEUE)
        while True:
            found = [(text.find(m, pos), m) for m in markers if text.find(m, pos) >= 0]
            if not found:
                parts.append(text[pos:])
                return parts
            at, marker = min(found)
            parts.append(text[pos:at])
            parts.append(marker)
            pos = at + len(marker)

    def message(self, job_id: str, attempt_no: int, queue: str) -> bytes:
        """One job's message (`process_job(job_id, attempt_no)`), as the bytes kombu would
        LPUSH."""
        return self._fill(self._parts, [job_id, int(attempt_no)], queue)

    def chunk_message(self, pairs: Sequence[tuple[str, int]], queue: str) -> bytes:
        """One message for several jobs (`process_jobs([[job_id, attempt_no], ...])`)."""
        return self._fill(self._chunk_parts, [[[i, int(n)] for i, n in pairs]], queue)

    @staticmethod
    def _fill(parts: list[str], args: list[Any], queue: str) -> bytes:
        body = _BODY_FORMAT % json.dumps(args)
        # The task id doubles as the delivery tag: both only need to be unique.
        tid = str(uuid.uuid4())
        values = {_TID: tid, _TAG: tid, _ARGSREPR: _json_str(repr(args)),
                  _BODY: base64.b64encode(body.encode()).decode("ascii"),
                  _QUEUE: _json_str(queue)}
        return "".join([values.get(p, p) for p in parts]).encode()

    def publish(self, items: Sequence[tuple[str, int, str]], max_chunk: int = 1) -> int:
        """Push every (job id, attempt number, queue) in one pipeline; returns the count.

        With `max_chunk` > 1, consecutive jobs of a queue may share a `process_jobs`
        message (see `chunk_size`); a job alone still gets a `process_job` one.

        Raises kombu's OperationalError if the broker cannot be reached (nothing, or a prefix of
        the queues' messages, was pushed; the store still says queued, so `resume` and the
        sweeper publish the rest)."""
        if not items:
            return 0
        messages_of = {queue: [self.message(*group[0], queue) if len(group) == 1
                               else self.chunk_message(group, queue)
                               for group in chunks(pairs, max_chunk)]
                       for queue, pairs in by_queue(items).items()}
        import redis
        from kombu.exceptions import OperationalError

        try:
            with self.client.pipeline(transaction=False) as pipe:
                for queue, messages in messages_of.items():
                    for i in range(0, len(messages), _LPUSH_MAX):
                        pipe.lpush(self.prefix + queue, *messages[i:i + _LPUSH_MAX])
                pipe.execute()
        except redis.RedisError as e:  # what send_task raises too, so callers handle one type
            raise OperationalError(f"cannot publish to the broker: {e}") from e
        return len(items)
