"""The application API: enqueue one request from code, get a handle, wait for the answer.

    from batchroute import Client
    handle = Client.from_env().enqueue(messages=[...], task="classify")
    result = handle.wait(timeout=60)   # content, model, tier, cost_usd

The job goes through the same store, router and queues as a submitted batch;
waiting polls the store, which is the source of truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from batchroute.config import Config, load_config
from batchroute.dispatch import CeleryDispatcher, Dispatcher
from batchroute.ingest import job_row
from batchroute.jobspec import parse_line
from batchroute.store import FAILED, SUCCEEDED, Store


class JobFailed(RuntimeError):
    """The job ended without an accepted answer; `.code` and `.message` say why."""

    def __init__(self, job_id: str, code: str, message: str) -> None:
        super().__init__(f"job {job_id} failed ({code}): {message}")
        self.job_id, self.code, self.message = job_id, code, message


class JobTimeout(TimeoutError):
    pass


@dataclass(frozen=True)
class JobResult:
    job_id: str
    content: str
    model: str
    provider: str
    tier: int
    cost_usd: float
    attempts: int
    body: dict[str, Any]


class JobHandle:
    def __init__(self, store: Store, job_id: str, custom_id: str) -> None:
        self.store, self.job_id, self.custom_id = store, job_id, custom_id

    def status(self) -> str:
        job = self.store.get_job(self.job_id)
        return job.state if job else "unknown"

    def wait(self, timeout: float = 300.0, poll_s: float = 0.1) -> JobResult:
        """Block until the job ends; raise JobFailed or JobTimeout rather than return junk.

        `timeout` is a hard bound on wall time: each look at the store runs in a helper
        thread waited on for what is left of it, so a database that hangs (a dead
        connection, a full pool, a server away) cannot hold the caller past it."""
        deadline = time.monotonic() + timeout
        while True:
            result = _bounded(self._check, deadline - time.monotonic())
            if result is _PENDING:
                raise JobTimeout(f"job {self.job_id} not finished after {timeout}s (the "
                                 "store did not answer in time)")
            if result is not None:
                return cast(JobResult, result)
            left = deadline - time.monotonic()
            if left <= 0:
                raise JobTimeout(f"job {self.job_id} not finished after {timeout}s; is a "
                                 "worker consuming its queue?")
            time.sleep(min(poll_s, left))

    async def wait_async(self, timeout: float = 300.0, poll_s: float = 0.1) -> JobResult:
        """As `wait`, the timeout a hard bound too."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = await asyncio.wait_for(_in_daemon_thread(self._check),
                                                max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise JobTimeout(f"job {self.job_id} not finished after {timeout}s") from None
            if result is not None:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                raise JobTimeout(f"job {self.job_id} not finished after {timeout}s")
            await asyncio.sleep(min(poll_s, left))

    def _check(self) -> JobResult | None:
        job = self.store.get_job(self.job_id)
        if job is None:
            raise JobFailed(self.job_id, "not_found", "no such job in the store")
        if job.state == FAILED:
            err = job.error or {}
            raise JobFailed(self.job_id, str(err.get("code", "failed")), str(err.get("message")))
        if job.state != SUCCEEDED or job.result is None:
            return None
        attempts = self.store.job_attempts(job.id)
        content = job.result["choices"][0]["message"].get("content") or ""
        return JobResult(job_id=job.id, content=content, model=job.model, provider=job.provider,
                         tier=job.tier, cost_usd=sum(a.cost_usd for a in attempts),
                         attempts=len(attempts), body=job.result)


_PENDING = object()


def _bounded(fn: Callable[[], Any], seconds: float) -> Any:
    """fn() if it returns within `seconds`, else _PENDING (the call goes on in a daemon
    thread and its result is dropped); fn's exception is raised here."""
    if seconds <= 0:
        return _PENDING
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as e:  # handed to the caller
            box.append((False, e))

    thread = threading.Thread(target=run, name="batchroute-wait", daemon=True)
    thread.start()
    thread.join(seconds)
    if not box:
        return _PENDING
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _in_daemon_thread(fn: Callable[[], Any]) -> asyncio.Future[Any]:
    """fn() in a daemon thread, as an awaitable. Not asyncio.to_thread: a hung call in the
    default executor would hold up the loop's shutdown (asyncio.run waits for it)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def run() -> None:
        try:
            value, ok = fn(), True
        except BaseException as e:  # handed to the awaiting task
            value, ok = e, False
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(settle, ok, value)

    threading.Thread(target=run, name="batchroute-wait", daemon=True).start()
    return future


class Client:
    def __init__(self, config: Config, store: Store, dispatcher: Dispatcher,
                 batch: str = "app") -> None:
        self.config, self.store, self.dispatcher, self.batch = config, store, dispatcher, batch
        self.store.ensure_batch(batch, batch, "Client.enqueue")

    @classmethod
    def from_env(cls, batch: str = "app") -> Client:
        """Config from $BATCHROUTE_CONFIG, store from $BATCHROUTE_DATABASE_URL, broker from
        $BATCHROUTE_BROKER_URL: the same environment the workers read."""
        return cls(load_config(), Store(), CeleryDispatcher(), batch)

    def enqueue(self, messages: list[dict[str, Any]], task: str = "default", model: str = "auto",
                validators: list[dict[str, Any]] | None = None, custom_id: str | None = None,
                metadata: dict[str, Any] | None = None, max_tier: int | None = None,
                pin: str | None = None, **body: Any) -> JobHandle:
        """Enqueue one chat request; extra keyword arguments go into the request body."""
        options: dict[str, Any] = {"task": task}
        for key, value in (("validators", validators), ("metadata", metadata),
                           ("max_tier", max_tier), ("pin", pin)):
            if value is not None:
                options[key] = value
        cid = custom_id or uuid.uuid4().hex
        line = {"custom_id": cid, "body": {"model": model, "messages": messages, **body},
                "batchroute": options}
        spec = parse_line(json.dumps(line), 1, self.config)  # LineProblem names the field
        # Microsecond clock as line number: app jobs list in the order they were enqueued.
        row = job_row(self.config, self.batch, spec, time.time_ns() // 1000)  # or RouteError
        self.store.insert_jobs([row])
        self.dispatcher.enqueue(row["id"], 1, self.config.providers[row["provider"]].queue)
        return JobHandle(self.store, row["id"], cid)


class AsyncClient:
    """The same, for asyncio code: `await (await client.enqueue(...)).wait_async()`."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @classmethod
    def from_env(cls, batch: str = "app") -> AsyncClient:
        return cls(Client.from_env(batch))

    async def enqueue(self, messages: list[dict[str, Any]], **kwargs: Any) -> JobHandle:
        return await asyncio.to_thread(self.client.enqueue, messages, **kwargs)

    async def run(self, messages: list[dict[str, Any]], timeout: float = 300.0,
                  **kwargs: Any) -> JobResult:
        handle = await self.enqueue(messages, **kwargs)
        return await handle.wait_async(timeout)
