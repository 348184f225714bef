"""The simulated batch APIs against the providers' documented formats, over real HTTP.

Field lists below are copied from the public API references (OpenAI "The batch object",
"The file object", batch output/error lines; Anthropic "Message Batch" object and the
results JSONL), so a drift of the simulator from the real shapes fails here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from batchroute.sim import SimBatch, SimConfig, SimModel, SimServer

OPENAI_BATCH_FIELDS = {
    "id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status",
    "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at",
    "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
    "cancelled_at", "request_counts", "metadata",
}
OPENAI_STATUSES = {"validating", "failed", "in_progress", "finalizing", "completed",
                   "expired", "cancelling", "cancelled"}
OPENAI_FILE_FIELDS = {"id", "object", "bytes", "created_at", "filename", "purpose"}
ANTHROPIC_BATCH_FIELDS = {
    "id", "type", "processing_status", "request_counts", "ended_at", "created_at",
    "expires_at", "cancel_initiated_at", "archived_at", "results_url",
}
ANTHROPIC_COUNTS = {"processing", "succeeded", "errored", "canceled", "expired"}
HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "test"}
DELAY = 0.2


def _sim(**batch: Any) -> SimServer:
    config = SimConfig(models={"good": SimModel(context_window=300),
                               "flaky": SimModel(error_rates={500: 1.0})},
                       seed=1, batch=SimBatch(**{"delay_s": DELAY, **batch}))
    return SimServer(config).start()


@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = _sim()
    yield server
    server.stop()


def _chat(i: int, model: str = "good") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": f"Say the number {i}."}],
            "max_tokens": 50}


def _openai_file(http: httpx.Client, lines: list[Any]) -> str:
    content = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    reply = http.post("/v1/files", data={"purpose": "batch"},
                      files={"file": ("in.jsonl", content.encode())})
    assert reply.status_code == 200, reply.text
    assert set(reply.json()) == OPENAI_FILE_FIELDS
    return str(reply.json()["id"])


def _openai_batch(http: httpx.Client, file_id: str) -> dict[str, Any]:
    reply = http.post("/v1/batches", json={"input_file_id": file_id,
                                           "endpoint": "/v1/chat/completions",
                                           "completion_window": "24h"})
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def _wait(http: httpx.Client, path: str, key: str, ended: set[str],
          headers: dict[str, str] | None = None) -> dict[str, Any]:
    seen: set[str] = set()
    for _ in range(200):
        data = http.get(path, headers=headers).json()
        seen.add(data[key])
        if data[key] in ended:
            data["_seen"] = seen
            return dict(data)
        time.sleep(0.02)
    raise AssertionError(f"{path} never ended (seen {seen})")


def _line(cid: str, body: dict[str, Any], url: str = "/v1/chat/completions") -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


def _jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_openai_batch_formats_and_same_answers_as_sync(sim: SimServer) -> None:
    http = httpx.Client(base_url=sim.url, timeout=5)
    lines = [_line(f"req-{i}", _chat(i)) for i in range(4)]
    lines.append(_line("bad-body", {"model": "good", "messages": []}))  # a 400 for that line
    too_long = {"model": "good", "messages": [{"role": "user", "content": "word " * 400}]}
    lines.append(_line("too-long", too_long))  # a 400 context_length_exceeded
    batch = _openai_batch(http, _openai_file(http, lines))
    assert set(batch) == OPENAI_BATCH_FIELDS and batch["object"] == "batch"
    assert batch["status"] == "validating" and batch["output_file_id"] is None
    done = _wait(http, f"/v1/batches/{batch['id']}", "status", {"completed"})
    assert done["_seen"] <= OPENAI_STATUSES
    assert done["created_at"] <= done["in_progress_at"] <= done["finalizing_at"]
    assert done["request_counts"] == {"total": 6, "completed": 4, "failed": 2}
    assert done["completed_at"] >= done["created_at"]

    output = _jsonl(http.get(f"/v1/files/{done['output_file_id']}/content").text)
    errors = _jsonl(http.get(f"/v1/files/{done['error_file_id']}/content").text)
    assert [o["custom_id"] for o in output] != [f"req-{i}" for i in range(4)]  # map by id
    assert sorted(o["custom_id"] for o in output) == [f"req-{i}" for i in range(4)]
    for line in output + errors:
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert line["id"].startswith("batch_req_")
        assert set(line["response"]) == {"status_code", "request_id", "body"}
    by_id = {e["custom_id"]: e for e in errors}
    assert by_id["bad-body"]["response"]["status_code"] == 400
    assert by_id["bad-body"]["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert by_id["too-long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"

    # The same engine: the synchronous answer and usage for req-2 are identical.
    sync = http.post("/v1/chat/completions", json=_chat(2)).json()
    batched = next(o for o in output if o["custom_id"] == "req-2")["response"]["body"]
    assert batched["choices"][0]["message"] == sync["choices"][0]["message"]
    assert batched["usage"] == sync["usage"]
    assert sim.stats()["by_endpoint"]["openai_batch"] == 6


def test_openai_invalid_file_fails_the_batch_with_line_errors(sim: SimServer) -> None:
    http = httpx.Client(base_url=sim.url, timeout=5)
    lines: list[Any] = [_line("a", _chat(1)), "{not json", _line("a", _chat(2)),
                        _line("b", _chat(3), url="/v1/embeddings")]
    done = _wait(http, f"/v1/batches/{_openai_batch(http, _openai_file(http, lines))['id']}",
                 "status", {"failed", "completed"})
    assert done["status"] == "failed" and done["failed_at"] is not None
    assert done["errors"]["object"] == "list"
    assert [(e["code"], e["line"]) for e in done["errors"]["data"]] == [
        ("invalid_json_line", 2), ("duplicate_custom_id", 3), ("invalid_url", 4)]
    assert all(set(e) == {"code", "message", "param", "line"} for e in done["errors"]["data"])
    assert done["output_file_id"] is None and done["error_file_id"] is None


def test_openai_expiry_leaves_unfinished_requests_in_the_error_file() -> None:
    with _sim(expire_fraction=0.5) as server:
        http = httpx.Client(base_url=server.url, timeout=5)
        file_id = _openai_file(http, [_line(f"r{i}", _chat(i)) for i in range(4)])
        done = _wait(http, f"/v1/batches/{_openai_batch(http, file_id)['id']}", "status",
                     {"expired", "completed"})
        assert done["status"] == "expired" and done["expired_at"] is not None
        assert done["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
        output = _jsonl(http.get(f"/v1/files/{done['output_file_id']}/content").text)
        errors = _jsonl(http.get(f"/v1/files/{done['error_file_id']}/content").text)
        assert sorted(o["custom_id"] for o in output) == ["r0", "r1"]
        assert sorted(e["custom_id"] for e in errors) == ["r2", "r3"]
        assert all(e["response"] is None and e["error"]["code"] == "batch_expired"
                   for e in errors)


def test_openai_cancel() -> None:
    with _sim(delay_s=5.0) as server:
        http = httpx.Client(base_url=server.url, timeout=5)
        batch = _openai_batch(http, _openai_file(http, [_line("x", _chat(1))]))
        reply = http.post(f"/v1/batches/{batch['id']}/cancel").json()
        assert reply["status"] == "cancelling" and reply["cancelling_at"] is not None
        done = _wait(http, f"/v1/batches/{batch['id']}", "status", {"cancelled"})
        assert done["cancelled_at"] is not None
        errors = _jsonl(http.get(f"/v1/files/{done['error_file_id']}/content").text)
        assert [e["error"]["code"] for e in errors] == ["batch_cancelled"]
        again = http.post(f"/v1/batches/{batch['id']}/cancel")
        assert again.status_code == 400 and again.json()["error"]["type"] == \
            "invalid_request_error"
        missing = http.get("/v1/batches/batch_nope")
        assert missing.status_code == 404 and set(missing.json()["error"]) == {
            "message", "type", "param", "code"}


def test_openai_limits() -> None:
    with _sim(openai_max_requests=3, openai_max_bytes=2000) as server:
        http = httpx.Client(base_url=server.url, timeout=5)
        big = http.post("/v1/files", data={"purpose": "batch"},
                        files={"file": ("in.jsonl", b"x" * 2001)})
        assert big.status_code == 400
        assert big.json()["error"]["type"] == "invalid_request_error"
        file_id = _openai_file(http, [_line(f"r{i}", _chat(i)) for i in range(4)])
        done = _wait(http, f"/v1/batches/{_openai_batch(http, file_id)['id']}", "status",
                     {"failed", "completed"})
        assert done["status"] == "failed"
        assert done["errors"]["data"][0]["code"] == "too_many_requests"


def _anthropic_create(http: httpx.Client, requests: list[dict[str, Any]]) -> httpx.Response:
    return http.post("/v1/messages/batches", headers=HEADERS, json={"requests": requests})


def _params(i: int, model: str = "good") -> dict[str, Any]:
    return {"model": model, "max_tokens": 50,
            "messages": [{"role": "user", "content": f"Say the number {i}."}]}


def test_anthropic_batch_formats_and_same_answers_as_sync(sim: SimServer) -> None:
    http = httpx.Client(base_url=sim.url, timeout=5)
    requests = [{"custom_id": f"req-{i}", "params": _params(i)} for i in range(3)]
    requests.append({"custom_id": "no-max", "params": {"model": "good", "messages": [
        {"role": "user", "content": "hi"}]}})
    created = _anthropic_create(http, requests)
    assert created.status_code == 200, created.text
    batch = created.json()
    assert set(batch) == ANTHROPIC_BATCH_FIELDS and batch["type"] == "message_batch"
    assert batch["id"].startswith("msgbatch_") and batch["processing_status"] == "in_progress"
    assert batch["request_counts"] == {**dict.fromkeys(ANTHROPIC_COUNTS, 0), "processing": 4}
    assert batch["results_url"] is None and batch["created_at"].endswith("Z")
    early = http.get(f"/v1/messages/batches/{batch['id']}/results", headers=HEADERS)
    assert early.status_code == 400 and early.json()["type"] == "error"

    done = _wait(http, f"/v1/messages/batches/{batch['id']}", "processing_status", {"ended"},
                 HEADERS)
    assert done["request_counts"] == {**dict.fromkeys(ANTHROPIC_COUNTS, 0), "succeeded": 3,
                                      "errored": 1}
    assert done["ended_at"] is not None
    results = _jsonl(http.get(done["results_url"], headers=HEADERS).text)
    assert [r["custom_id"] for r in results] != ["req-0", "req-1", "req-2", "no-max"]
    by_id = {r["custom_id"]: r["result"] for r in results}
    assert set(by_id) == {"req-0", "req-1", "req-2", "no-max"}
    assert set(by_id["req-1"]) == {"type", "message"} and by_id["req-1"]["type"] == "succeeded"
    assert by_id["no-max"] == {"type": "errored", "error": {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: Field required"}}}
    sync = http.post("/v1/messages", headers=HEADERS, json=_params(1)).json()
    message = by_id["req-1"]["message"]
    assert message["content"] == sync["content"] and message["usage"] == sync["usage"]
    assert set(message) == set(sync)


def test_anthropic_expiry_and_cancel() -> None:
    with _sim(expire_fraction=0.34) as server:
        http = httpx.Client(base_url=server.url, timeout=5)
        batch = _anthropic_create(http, [{"custom_id": f"r{i}", "params": _params(i)}
                                         for i in range(3)]).json()
        done = _wait(http, f"/v1/messages/batches/{batch['id']}", "processing_status",
                     {"ended"}, HEADERS)
        assert done["request_counts"]["succeeded"] == 1
        assert done["request_counts"]["expired"] == 2
        results = _jsonl(http.get(done["results_url"], headers=HEADERS).text)
        assert sorted(r["result"]["type"] for r in results) == ["expired", "expired",
                                                                "succeeded"]
    with _sim(delay_s=5.0) as server:
        http = httpx.Client(base_url=server.url, timeout=5)
        batch = _anthropic_create(http, [{"custom_id": "only", "params": _params(1)}]).json()
        cancelled = http.post(f"/v1/messages/batches/{batch['id']}/cancel", headers=HEADERS)
        assert cancelled.json()["processing_status"] == "canceling"
        assert cancelled.json()["cancel_initiated_at"] is not None
        done = _wait(http, f"/v1/messages/batches/{batch['id']}", "processing_status",
                     {"ended"}, HEADERS)
        assert done["request_counts"]["canceled"] == 1
        results = _jsonl(http.get(done["results_url"], headers=HEADERS).text)
        assert results == [{"custom_id": "only", "result": {"type": "canceled"}}]


def test_anthropic_limits_and_custom_ids() -> None:
    with _sim(anthropic_max_requests=2, anthropic_max_bytes=3000) as server:
        http = httpx.Client(base_url=server.url, timeout=5)
        too_many = _anthropic_create(http, [{"custom_id": f"r{i}", "params": _params(i)}
                                            for i in range(3)])
        assert too_many.status_code == 400
        assert too_many.json()["error"]["type"] == "invalid_request_error"
        too_big = _anthropic_create(http, [{"custom_id": "r", "params": {
            **_params(1), "system": "x" * 3000}}])
        assert too_big.status_code == 413
        assert too_big.json() == {"type": "error", "error": {
            "type": "request_too_large", "message": too_big.json()["error"]["message"]}}
        for bad in ("has space", "x" * 65, ""):
            reply = _anthropic_create(http, [{"custom_id": bad, "params": _params(1)}])
            assert reply.status_code == 400, bad
        dup = _anthropic_create(http, [{"custom_id": "d", "params": _params(1)}] * 2)
        assert dup.status_code == 400 and "duplicate" in dup.json()["error"]["message"]
        no_version = http.post("/v1/messages/batches", headers={"x-api-key": "k"},
                               json={"requests": []})
        assert no_version.status_code == 400


def test_openai_one_model_per_batch(sim: SimServer) -> None:
    http = httpx.Client(base_url=sim.url, timeout=5)
    file_id = _openai_file(http, [_line("a", _chat(1)), _line("b", _chat(2, "flaky"))])
    done = _wait(http, f"/v1/batches/{_openai_batch(http, file_id)['id']}", "status",
                 {"failed", "completed"})
    assert done["status"] == "failed"
    assert [e["code"] for e in done["errors"]["data"]] == ["model_mismatch"]


def test_batches_ignore_sync_rate_limits_and_survive_a_restart() -> None:
    """Batch work is not counted against rpm (separate queue at real providers) nor
    slowed by per-request latency, and a provider that is unreachable for a while still
    finishes its batches."""
    config = SimConfig(models={"good": SimModel(rpm=1, latency_ms=2000)}, seed=1,
                       batch=SimBatch(delay_s=DELAY))
    with SimServer(config) as server:
        http = httpx.Client(base_url=server.url, timeout=5)
        file_id = _openai_file(http, [_line(f"r{i}", _chat(i)) for i in range(3)])
        batch = _openai_batch(http, file_id)
        server.stop()
        time.sleep(DELAY * 1.5)
        server.start()
        http = httpx.Client(base_url=server.url, timeout=5)
        done = _wait(http, f"/v1/batches/{batch['id']}", "status", {"completed", "expired"})
        assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}


def test_batch_settings_from_toml_table_and_runtime_control(sim: SimServer) -> None:
    parsed = SimConfig.from_dict({"batch": {"delay_s": 3, "expire_fraction": 0.5,
                                            "openai_max_requests": 10}})
    assert parsed.batch == SimBatch(delay_s=3.0, expire_fraction=0.5, openai_max_requests=10)
    assert SimConfig.from_dict(parsed.to_dict()).batch == parsed.batch
    with pytest.raises(ValueError, match="unknown key"):
        SimConfig.from_dict({"batch": {"delay": 1}})
    with pytest.raises(ValueError, match="between 0 and 1"):
        SimConfig.from_dict({"batch": {"expire_fraction": 2}})
    http = httpx.Client(base_url=sim.url, timeout=5)
    reply = http.post("/_sim/batch", json={"delay_s": 0.0, "expire_fraction": 0.0})
    assert reply.status_code == 200 and reply.json()["expire_fraction"] == 0.0
    assert http.post("/_sim/batch", json={"bogus": 1}).status_code == 400
    file_id = _openai_file(http, [_line("r", _chat(1))])
    done = _wait(http, f"/v1/batches/{_openai_batch(http, file_id)['id']}", "status",
                 {"expired", "completed"})
    assert done["status"] == "expired"
