"""Output lines as the OpenAI tools read them (issue #17).

`response.request_id` is the provider's request id (its `x-request-id` header), not the
completion id; a provider's HTTP error puts the provider's status code, request id and
error body in `response`, while `error.code` stays batchroute's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchroute.config import load_config
from batchroute.embedded import run_file
from batchroute.store import Store, get_engine


def _line(custom_id: str, **body: object) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "gpt-4o", "max_tokens": 3, "messages": [
                           {"role": "user", "content": "Is this spam? Answer yes or no. WIN"}],
                           **body}})


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict], Store]:
    tmp = tmp_path_factory.mktemp("fmt")
    src = tmp / "in.jsonl"
    # n=500 is refused by the provider with a 400 (the simulator, like OpenAI, allows 1..128)
    src.write_text(_line("ok-1") + "\n" + _line("bad-1", n=500) + "\n")
    store = Store(get_engine(f"sqlite:///{tmp / 'fmt.db'}"))
    out = tmp / "out.jsonl"
    run_file(src, out, None, load_config(), store=store)
    lines = [json.loads(x) for x in Path(out).read_text().splitlines()]
    return {x["custom_id"]: x for x in lines}, store


def test_request_id_is_the_providers_x_request_id(run: tuple[dict[str, dict], Store]) -> None:
    lines, store = run
    ok = lines["ok-1"]
    rid = ok["response"]["request_id"]
    assert rid.startswith("req_") and rid != ok["response"]["body"]["id"]
    job_attempts = [a for a in store.attempts(store.find_batch("in.jsonl").id)  # type: ignore[union-attr]
                    if a.request_id == rid]
    assert len(job_attempts) == 1 and job_attempts[0].outcome == "ok"


def test_provider_http_error_is_in_response_with_our_error_code(
        run: tuple[dict[str, dict], Store]) -> None:
    bad = run[0]["bad-1"]
    assert bad["error"]["code"] == "invalid_request"
    assert "provider_response" not in bad["error"]
    resp = bad["response"]
    assert resp["status_code"] == 400
    assert resp["request_id"].startswith("req_")
    assert resp["body"]["error"]["param"] == "n"
    assert "between 1 and 128" in resp["body"]["error"]["message"]
