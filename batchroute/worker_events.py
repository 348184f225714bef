"""Task events for Flower, sent in batches rather than one broker round trip each.

Celery's worker buffers task events and asks its event loop to publish the buffer "soon"
after every event. A no-op task finishes so fast that many events share one publish; a
batchroute job takes milliseconds to seconds, so each of its three events
(received, started, succeeded) went out in a publish of its own, on the worker's single
event-loop thread: ~20% of a busy worker's CPU (py-spy, zero-latency simulator). This
consumer publishes the buffer every 50 ms instead (``BATCHROUTE_EVENT_FLUSH_S``; Celery still
publishes at once when the buffer holds ``buffer_limit`` events), so Flower sees a task
at most that much later. `batchroute.broker` installs it as ``worker_consumer`` for
every app built by ``make_celery``, the no-op baseline of benchmarks/worker_bench.py too.
"""

from __future__ import annotations

import contextlib
import os

from celery.worker.consumer import Consumer


def _flush_interval() -> float:
    return float(os.environ.get("BATCHROUTE_EVENT_FLUSH_S") or 0.05)


class EventBatchingConsumer(Consumer):
    """Celery's consumer with task events coalesced over a short interval."""

    _event_flush_due = False

    def on_send_event_buffered(self) -> None:
        # Called by whichever thread sent the event: pool threads for started/succeeded.
        # hub.call_soon is the thread-safe way in; the timer is set on the loop's thread.
        if self.hub is None or self._event_flush_due:
            return
        self._event_flush_due = True
        self.hub.call_soon(self._schedule_event_flush)

    def _schedule_event_flush(self) -> None:
        self.hub.call_later(_flush_interval(), self._flush_due_events)

    def _flush_due_events(self) -> None:
        # Cleared before the flush: an event buffered during it schedules the next one.
        self._event_flush_due = False
        self._flush_events()

    def stop(self) -> None:
        # Celery does not flush its event buffer when it stops: send what the timer holds.
        self._flush_quietly()
        super().stop()

    def shutdown(self) -> None:
        self._flush_quietly()
        super().shutdown()

    def _flush_quietly(self) -> None:
        # The broker may already be gone; events are monitoring only.
        with contextlib.suppress(Exception):
            self._flush_events()
