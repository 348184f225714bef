"""batchroute.provider_batch: file formats (pure), pricing, and the client over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from batchroute.completion import Usage
from batchroute.config import ModelConfig, Price
from batchroute.provider_batch import client as batch_client
from batchroute.provider_batch import formats, pricing
from batchroute.providers.base import ErrorKind, ProviderError
from batchroute.sim import SimBatch, SimConfig, SimModel, SimServer

from .recording_server import recording_server


def _body(i: int) -> dict[str, Any]:
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": f"Say the number {i}."}],
            "max_tokens": 40, "temperature": 0, "batchroute": {"ignored": True}}


# --- formats (pure) -------------------------------------------------------------------


def test_custom_ids_keep_safe_ids_and_hash_the_rest() -> None:
    mapping = formats.custom_ids(["job-1", "job 2/ü", "x" * 80])
    assert mapping["job-1"] == "job-1"
    assert all(formats._CUSTOM_ID.match(cid) for cid in mapping)
    assert sorted(mapping.values()) == sorted(["job-1", "job 2/ü", "x" * 80])
    with pytest.raises(ValueError, match="maps two jobs"):
        formats.custom_ids(["same", "same"])


def test_request_lines_follow_the_documented_shapes() -> None:
    content = formats.openai_input_file([("a", "gpt-x", _body(1))])
    line = json.loads(content)
    assert set(line) == {"custom_id", "method", "url", "body"}
    assert (line["method"], line["url"]) == ("POST", "/v1/chat/completions")
    assert line["body"]["model"] == "gpt-x" and "batchroute" not in line["body"]
    created = json.loads(formats.anthropic_create_body([("a", "claude-x", _body(1))]))
    entry = created["requests"][0]
    assert set(entry) == {"custom_id", "params"}
    assert entry["params"]["system"] == "Be brief." and entry["params"]["max_tokens"] == 40
    assert [m["role"] for m in entry["params"]["messages"]] == ["user"]
    with pytest.raises(formats.BatchTooLarge):
        formats.openai_input_file([])


def test_limits_are_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    assert formats.LIMITS == {"openai": (50_000, 200 * 1024 * 1024),
                              "anthropic": (100_000, 256 * 1024 * 1024)}
    monkeypatch.setitem(formats.LIMITS, "openai", (2, 10**6))
    with pytest.raises(formats.BatchTooLarge, match="3 requests, the limit is 2"):
        formats.openai_input_file([(str(i), "m", _body(i)) for i in range(3)])
    monkeypatch.setitem(formats.LIMITS, "anthropic", (10, 100))
    with pytest.raises(formats.BatchTooLarge, match="bytes"):
        formats.anthropic_create_body([("a", "m", _body(1))])


def _ok_body(content: Any = "four", usage: Any = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": usage or {"prompt_tokens": 5, "completion_tokens": 1}}


def test_openai_result_lines_are_checked_like_sync_replies() -> None:
    lines = [
        {"id": "b1", "custom_id": "ok", "error": None,
         "response": {"status_code": 200, "request_id": "r1", "body": _ok_body()}},
        {"id": "b2", "custom_id": "broken", "error": None,  # content is not a string
         "response": {"status_code": 200, "request_id": "r2", "body": _ok_body(["x"])}},
        {"id": "b3", "custom_id": "limited", "error": None, "response": {
            "status_code": 429, "request_id": "r3", "body": {"error": {
                "message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}}},
        {"id": "b4", "custom_id": "late", "response": None,
         "error": {"code": "batch_expired", "message": "window expired"}},
        {"id": "b5", "custom_id": "stopped", "response": None,
         "error": {"code": "batch_cancelled", "message": "cancelled"}},
        {"id": "b6", "custom_id": "stranger", "error": None,
         "response": {"status_code": 200, "request_id": "r6", "body": _ok_body()}},
        {"id": "b7", "custom_id": "ok", "error": None,
         "response": {"status_code": 200, "request_id": "r7", "body": _ok_body("dup")}},
    ]
    content = b"\n".join(json.dumps(x).encode() for x in lines) + b"\n{truncated"
    expected = ["ok", "broken", "limited", "late", "stopped", "never"]
    parsed = formats.parse_openai_results(content, expected)
    items = parsed.items
    assert items["ok"].state == "succeeded" and items["ok"].completion is not None
    assert items["ok"].completion.content == "four"
    assert items["ok"].completion.usage == Usage(5, 1)
    assert items["ok"].completion.request_id == "r1"
    assert items["broken"].error is not None
    assert items["broken"].error.kind == ErrorKind.MALFORMED_REPLY
    assert items["limited"].error is not None
    assert items["limited"].error.kind == ErrorKind.RATE_LIMITED
    assert (items["late"].state, items["stopped"].state) == ("expired", "canceled")
    assert parsed.missing(expected) == ["never"]
    assert len(parsed.problems) == 3  # unknown id, duplicate id, truncated line
    assert any("unknown custom_id" in p for p in parsed.problems)


def test_anthropic_result_lines_are_checked_like_sync_replies() -> None:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
               "content": [{"type": "text", "text": "four"}], "stop_reason": "max_tokens",
               "usage": {"input_tokens": 7, "output_tokens": 2}}
    lines = [
        {"custom_id": "ok", "result": {"type": "succeeded", "message": message}},
        {"custom_id": "bad", "result": {"type": "errored", "error": {"type": "error", "error": {
            "type": "invalid_request_error", "message": "max_tokens: Field required"}}}},
        {"custom_id": "down", "result": {"type": "errored", "error": {"type": "error",
                                                                      "error": {
            "type": "overloaded_error", "message": "Overloaded"}}}},
        {"custom_id": "late", "result": {"type": "expired"}},
        {"custom_id": "stopped", "result": {"type": "canceled"}},
        {"custom_id": "odd", "result": {"type": "mystery"}},
        [1, 2],
    ]
    content = b"\n".join(json.dumps(x).encode() for x in lines)
    parsed = formats.parse_anthropic_results(content, ["ok", "bad", "down", "late",
                                                       "stopped", "odd"])
    ok = parsed.items["ok"].completion
    assert ok is not None and ok.content == "four" and ok.finish_reason == "length"
    assert ok.usage == Usage(7, 2)
    assert ok.body["object"] == "chat.completion"  # the same normalised body as sync
    bad, down = parsed.items["bad"].error, parsed.items["down"].error
    assert bad is not None and bad.kind == ErrorKind.INVALID_REQUEST
    assert down is not None and down.kind == ErrorKind.OVERLOADED
    assert parsed.items["late"].state == "expired"
    assert parsed.items["stopped"].state == "canceled"
    assert parsed.missing(["odd"]) == ["odd"] and len(parsed.problems) == 2


def test_result_lines_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats, "MAX_LINE_BYTES", 100)
    deep = b'{"custom_id": "d", "result": ' + b"[" * 80 + b"]" * 80 + b"}"
    huge = json.dumps({"custom_id": "h", "result": {"type": "expired", "pad": "x" * 200}})
    parsed = formats.parse_anthropic_results(deep + b"\n" + huge.encode(), ["d", "h"])
    assert parsed.items == {} and len(parsed.problems) == 2


# --- pricing --------------------------------------------------------------------------


def test_batch_pricing_uses_known_batch_prices_else_the_discount() -> None:
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000)
    known = ModelConfig(name="mini", provider="openai", tier=1, api_model="gpt-4o-mini")
    assert pricing.batch_cost(known, usage, discount=0.9) == pytest.approx(0.375)
    explicit = ModelConfig(name="own", provider="openai", tier=1, api_model="own-model",
                           price=Price(input_per_mtok=2.0, output_per_mtok=6.0))
    assert pricing.batch_cost(explicit, usage) == pytest.approx(4.0)
    assert pricing.batch_cost(explicit, usage, discount=0.25) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        pricing.batch_cost(explicit, usage, discount=1.5)


# --- client round trip over HTTP ------------------------------------------------------


@pytest.fixture
def sim() -> Iterator[SimServer]:
    config = SimConfig(models={"good": SimModel()}, seed=3, batch=SimBatch(delay_s=0.2))
    server = SimServer(config).start()
    yield server
    server.stop()


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_client_round_trip(sim: SimServer, api: str) -> None:
    jobs = ["job-1", "job 2", "job-3"]
    mapping = formats.custom_ids(jobs)
    requests = [(cid, "good", _body(i)) for i, cid in enumerate(mapping)]
    with httpx.Client() as http:
        client: batch_client.BatchClient
        if api == "openai":
            client = batch_client.OpenAIBatchClient(http, f"{sim.url}/v1", "k", timeout_s=5)
            content = formats.openai_input_file(requests)
        else:
            client = batch_client.AnthropicBatchClient(http, f"{sim.url}/v1", "k",
                                                       timeout_s=5)
            content = formats.anthropic_create_body(requests)
        batch_id = client.submit(content)
        status = batch_client.wait(client, batch_id, deadline_s=8, interval_s=0.05)
        assert status.ended and status.status in ("completed", "ended")
        parsed = batch_client.parse(client, client.results(status), list(mapping))
        assert parsed.problems == [] and parsed.missing(mapping) == []
        answers = {mapping[cid]: item.completion for cid, item in parsed.items.items()}
        assert set(answers) == set(jobs)
        sync = http.post(f"{sim.url}/v1/chat/completions", json={
            "model": "good", **{k: v for k, v in _body(1).items() if k != "batchroute"}})
        one = answers["job 2"]
        assert one is not None and one.content == sync.json()["choices"][0]["message"][
            "content"]
        assert one.usage.completion_tokens == sync.json()["usage"]["completion_tokens"]

        with pytest.raises(ProviderError) as missing:
            client.poll("nope")
        assert missing.value.status == 404


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_client_cancel_and_result_size_cap(sim: SimServer, api: str) -> None:
    sim.set_batch(SimBatch(delay_s=5.0))
    with httpx.Client() as http:
        client: batch_client.BatchClient
        requests = [("a", "good", _body(1)), ("b", "good", _body(2))]
        if api == "openai":
            client = batch_client.OpenAIBatchClient(http, f"{sim.url}/v1", "k", timeout_s=5,
                                                    max_result_bytes=50)
            batch_id = client.submit(formats.openai_input_file(requests))
        else:
            client = batch_client.AnthropicBatchClient(http, f"{sim.url}/v1", "k",
                                                       timeout_s=5, max_result_bytes=50)
            batch_id = client.submit(formats.anthropic_create_body(requests))
        assert client.cancel(batch_id).status in ("cancelling", "canceling")
        status = batch_client.wait(client, batch_id, deadline_s=3, interval_s=0.05)
        assert status.ended and status.status in ("cancelled", "ended")
        with pytest.raises(ProviderError) as too_big:
            client.results(status)
        assert too_big.value.kind == ErrorKind.REPLY_TOO_LARGE


def test_openai_file_holds_one_model() -> None:
    with pytest.raises(ValueError, match="one model"):
        formats.openai_input_file([("a", "m1", _body(1)), ("b", "m2", _body(2))])


def test_anthropic_results_never_follow_a_foreign_results_url(sim: SimServer) -> None:
    """The API key goes with the results request: a results_url on another host is not
    followed, the configured base URL is used instead."""
    seen: list[str] = []

    def record(request: httpx.Request) -> None:
        seen.append(str(request.url))

    with httpx.Client(event_hooks={"request": [record]}) as http:
        client = batch_client.AnthropicBatchClient(http, f"{sim.url}/v1", "k", timeout_s=5)
        batch_id = client.submit(formats.anthropic_create_body([("a", "good", _body(1))]))
        status = batch_client.wait(client, batch_id, deadline_s=8, interval_s=0.05)
        forged = batch_client.BatchStatus(
            id=status.id, status=status.status, ended=True,
            result_refs=("http://attacker.invalid/steal",))
        parsed = batch_client.parse(client, client.results(forged), ["a"])
        assert parsed.items["a"].state == "succeeded"
        assert not any("attacker" in url for url in seen)


def test_split_requests_fits_every_batch_in_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    requests = [(f"r{i}", "m1" if i % 3 else "m2", _body(i)) for i in range(20)]
    monkeypatch.setitem(formats.LIMITS, "openai", (4, 10**6))
    batches = formats.split_requests("openai", requests)
    assert sorted(r[0] for b in batches for r in b) == sorted(r[0] for r in requests)
    for batch in batches:
        assert len({model for _, model, _ in batch}) == 1 and len(batch) <= 4
        formats.openai_input_file(batch)  # within limits: does not raise
    monkeypatch.setitem(formats.LIMITS, "anthropic", (100, 1000))
    batches = formats.split_requests("anthropic", requests)
    assert len(batches) > 1 and sum(len(b) for b in batches) == 20
    for batch in batches:
        assert len(formats.anthropic_create_body(batch)) <= 1000
    monkeypatch.setitem(formats.LIMITS, "anthropic", (100, 50))
    with pytest.raises(formats.BatchTooLarge, match="alone"):
        formats.split_requests("anthropic", requests[:1])


def test_client_reports_a_failed_openai_batch_with_its_line_errors(sim: SimServer) -> None:
    line = formats.openai_input_file([("same", "good", _body(1))])
    with httpx.Client() as http:
        client = batch_client.OpenAIBatchClient(http, f"{sim.url}/v1", "k", timeout_s=5)
        batch_id = client.submit(line + line)  # a duplicate custom_id fails validation
        status = batch_client.wait(client, batch_id, deadline_s=8, interval_s=0.05)
        assert (status.status, status.ended, status.result_refs) == ("failed", True, ())
        assert status.errors == ("line 2: duplicate_custom_id: The custom_id 'same' is "
                                 "not unique.",)
        parsed = batch_client.parse(client, client.results(status), ["same"])
        assert parsed.missing(["same"]) == ["same"]


def ended_batches(server: SimServer, api: str, n: int, start: float) -> list[str]:
    """n ended, empty batches in the simulator's registry, one a second from ``start``
    (someone else's history on a busy account; only the list endpoints read them)."""
    from batchroute.sim.batches import BatchJob

    ids = []
    with server.batches.lock:
        for i in range(n):
            job = BatchJob(api=api, id=f"{'batch_' if api == 'openai' else 'msgbatch_'}h{i:04d}",
                           created_at=start + i, delay_s=0.0, items=[], limit=0,
                           ended_at=start + i, ended_as="completed")
            job.done.set()
            server.batches.jobs[job.id] = job
            ids.append(job.id)
    return ids


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_recent_pages_through_every_batch_newest_first(sim: SimServer, api: str) -> None:
    """A busy account has more batches than one list page (100): `recent` reads the
    pages with the API's own cursor (`after` / `after_id`), as the caller reads on."""
    import time

    ids = ended_batches(sim, api, 250, time.time() - 1000)
    with httpx.Client() as http:
        client: Any = (batch_client.OpenAIBatchClient if api == "openai"
                       else batch_client.AnthropicBatchClient)(http, f"{sim.url}/v1", "k",
                                                               timeout_s=5)
        got = [s.id for s in client.recent()]
        assert got == ids[::-1]  # all 250, newest first, none twice
        first = client.recent()
        assert [next(first).id for _ in range(3)] == ids[::-1][:3]  # lazily: one page
        assert [s.id for s in client.recent(max_pages=2)] == ids[::-1][:200]


def test_recent_stops_when_a_provider_ignores_the_cursor() -> None:
    """A gateway that always answers the first page with has_more: true cannot make the
    lookup loop: a page that adds nothing new ends it."""
    page = json.dumps({"object": "list", "has_more": True, "data": [
        {"id": f"batch_{i}", "status": "completed"} for i in range(3)]}).encode()
    with recording_server(page) as (base, asked), httpx.Client() as http:
        client = batch_client.OpenAIBatchClient(http, f"{base}/v1", "k", timeout_s=5)
        assert [s.id for s in client.recent()] == ["batch_0", "batch_1", "batch_2"]
    assert asked == ["/v1/batches?limit=100", "/v1/batches?limit=100&after=batch_2"]
