"""Operations and scale on real parts: Flower against a real worker, the Prometheus metrics,
the compose file against the Compose specification, bulk publishing that a real worker
runs, and bulk ingestion (parallel parsers, COPY on PostgreSQL) that stores exactly what
the one-row-at-a-time path stores.

The Compose schema in tests/data/compose-spec.json is the one check-jsonschema 0.39.0
(PyPI) vendors from the compose-spec project (Apache-2.0, tests/data/LICENSE.compose-spec):
the test validates without a Docker engine or network access.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batchroute.cli import main
from batchroute.config import load_config
from batchroute.dispatch import CeleryDispatcher
from batchroute.ingest import ingest_file, ingest_lines
from batchroute.store import FINISHED, Job, Store

from .conftest import EXAMPLE, ROOT, wait_for

CONFIG = load_config()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def classify_batch(path: Path, n: int, dupes: int = 0, bad: int = 0) -> Path:
    """n short classify requests, then `dupes` lines repeating earlier custom_ids and `bad`
    malformed lines, interleaved so they fall in different chunks."""
    lines = []
    for i in range(n):
        lines.append(json.dumps({
            "custom_id": f"job-{i:06d}", "body": {"model": "auto", "max_tokens": 5, "messages": [
                {"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": f"Ticket {i}: is it a complaint? "
                                            "Answer with one of: yes, no."}]},
            "batchroute": {"task": "classify",
                           "validators": [{"type": "choices", "choices": ["yes", "no"]}],
                           "metadata": {"n": i, "tab": "a\tb", "quote": "\\\"x\""}}}))
    for k in range(dupes):
        lines.insert((k * 7919) % len(lines) + len(lines) // 2, json.dumps({
            "custom_id": f"job-{k:06d}", "body": {"messages": [
                {"role": "user", "content": "a duplicate"}]}}))
    for k in range(bad):
        lines.insert((k * 104729) % len(lines), '{"custom_id": "broken", "body": ')
    path.write_text("\n".join(lines) + "\n")
    return path


def _done(store: Store, batch_id: str, total: int) -> bool:
    counts = store.state_counts(batch_id)
    return sum(counts.get(s, 0) for s in FINISHED) >= total


# ---- bulk publishing -------------------------------------------------------------------------
def test_bulk_message_is_the_message_send_task_writes(redis_url: str) -> None:
    """Field by field, the pipelined message equals Celery's own but for per-message ids."""
    import redis

    from batchroute.broker import TASK_NAME
    from batchroute.publish import RedisBulkPublisher

    dispatcher = CeleryDispatcher()
    client = redis.Redis.from_url(redis_url)
    dispatcher.app.send_task(TASK_NAME, args=["jabc", 3], queue="batchroute.cmp")
    theirs = json.loads(client.rpop("batchroute.cmp"))  # type: ignore[arg-type]
    ours = json.loads(RedisBulkPublisher(dispatcher.app).message("jabc", 3, "batchroute.cmp"))
    assert base64.b64decode(ours["body"]) == base64.b64decode(theirs["body"])
    assert set(ours["headers"]) == set(theirs["headers"])
    varying = {"id", "root_id", "ignore_result"}
    assert {k: v for k, v in ours["headers"].items() if k not in varying} == \
        {k: v for k, v in theirs["headers"].items() if k not in varying}
    assert ours["headers"]["argsrepr"] == "['jabc', 3]"  # what Flower shows: ids only
    for key in ("content-type", "content-encoding"):
        assert ours[key] == theirs[key]
    props, theirs_props = ours["properties"], theirs["properties"]
    assert props["delivery_info"] == theirs_props["delivery_info"]
    assert props["body_encoding"] == "base64" and props["priority"] == 0
    assert props["correlation_id"] == ours["headers"]["id"]


def test_bulk_publish_keeps_order_and_chunks_lpush(redis_url: str) -> None:
    import redis

    items = [(f"j{i:05d}", 1 + i % 2, "batchroute.sim" if i % 3 else "batchroute.other")
             for i in range(2500)]
    CeleryDispatcher().enqueue_many(items)
    client = redis.Redis.from_url(redis_url)
    got: dict[str, list[tuple[str, int]]] = {}
    sizes: dict[str, set[int]] = {}
    for queue in ("batchroute.sim", "batchroute.other"):
        while raw := client.rpop(queue):  # what the worker's BRPOP takes first
            msg = json.loads(raw)  # type: ignore[arg-type]
            args = json.loads(base64.b64decode(msg["body"]))[0]
            pairs = args[0] if msg["headers"]["task"] == "batchroute.process_jobs" else [args]
            sizes.setdefault(queue, set()).add(len(pairs))
            got.setdefault(queue, []).extend((j, n) for j, n in pairs)
    for queue in ("batchroute.sim", "batchroute.other"):
        assert got[queue] == [(j, n) for j, n, q in items if q == queue]  # FIFO per queue
    # 1,666 and 834 jobs: 6 and 3 jobs a message (the last one the rest), not one each.
    assert sizes == {"batchroute.sim": {6, 1666 % 6}, "batchroute.other": {3}}


def test_broker_down_is_reported_as_a_broker_error(tmp_path: Path) -> None:
    """Same exception as send_task, so `submit` prints its "is Redis running?" advice."""
    from kombu.exceptions import OperationalError

    from batchroute.broker import make_celery

    app = make_celery("t")
    app.conf.broker_url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(OperationalError):
        CeleryDispatcher(app).enqueue_many([("j1", 1, "batchroute.sim")])


@pytest.mark.integration
def test_a_worker_runs_bulk_published_jobs(start_worker: Any, tmp_path: Path) -> None:
    """A submitted batch is published through the pipeline path (it is a Redis broker) and
    a real worker runs every job of it."""
    src = classify_batch(tmp_path / "b.jsonl", 120)
    res = CliRunner().invoke(main, ["submit", str(src), "--json"])
    assert res.exit_code == 0, res.output
    batch_id = json.loads(res.stdout)["batch_id"]
    worker = start_worker(concurrency=16)
    store = Store()
    wait_for(lambda: _done(store, batch_id, 120), 120,
             f"the worker to run the batch; log:\n{worker.log()[-3000:]}")
    counts = store.state_counts(batch_id)
    assert counts.get("succeeded", 0) + counts.get("failed", 0) == 120
    assert counts.get("succeeded", 0) > 100


@pytest.mark.integration
def test_a_worker_runs_a_chunked_batch_to_the_end(start_worker: Any, tmp_path: Path,
                                                  redis_url: str) -> None:
    """600 jobs go out as 300 two-job messages; a real worker runs each job exactly once,
    escalations (single-job messages) included, attempts numbered 1..n."""
    import redis

    src = classify_batch(tmp_path / "b.jsonl", 600)
    res = CliRunner().invoke(main, ["submit", str(src), "--json"])
    assert res.exit_code == 0, res.output
    batch_id = json.loads(res.stdout)["batch_id"]
    assert redis.Redis.from_url(redis_url).llen("batchroute.sim") == 300
    worker = start_worker(concurrency=16)
    store = Store()
    wait_for(lambda: _done(store, batch_id, 600), 180,
             f"the worker to run the batch; log:\n{worker.log()[-3000:]}")
    jobs = list(store.iter_jobs(batch_id))
    assert len(jobs) == 600 and all(j.state in FINISHED for j in jobs)
    by_job: dict[str, list[int]] = {}
    for a in store.attempts(batch_id):
        by_job.setdefault(a.job_id, []).append(a.attempt_no)
    for j in jobs:
        assert sorted(by_job[j.id]) == list(range(1, j.attempt_no + 1)), j.id
    assert any(j.attempt_no > 1 for j in jobs)  # some escalated: singles after chunks


# ---- bulk ingestion --------------------------------------------------------------------------
def _rows(store: Store, batch_id: str) -> dict[str, dict[str, Any]]:
    skip = {"created_at", "updated_at"}
    return {j.custom_id: {k: v for k, v in j.model_dump().items() if k not in skip}
            for j in store.iter_jobs(batch_id)}


@pytest.mark.integration
def test_parallel_ingest_stores_what_the_row_by_row_path_stores(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    """Two forked parsers and the store's bulk path (COPY on PostgreSQL) against the
    ORM's one-transaction-per-chunk INSERT, on a file with duplicates and bad lines spread
    over several chunks: the same rows, the same rejected lines, the same first-wins rule."""
    from batchroute.ingest import CHUNK, _lines, _parse

    src = classify_batch(tmp_path / "b.jsonl", 2 * CHUNK + 500, dupes=40, bad=9)
    store = Store()
    monkeypatch.setenv("BATCHROUTE_INGEST_WORKERS", "2")
    result = ingest_file(CONFIG, store, CeleryDispatcher(), src)
    assert result.problem_count == 49 and result.jobs == 2 * CHUNK + 500
    assert result.enqueued == result.jobs
    assert sorted(n for n, _ in result.problems) == [n for n, _ in result.problems]

    # The reference: the ORM path, one row dict at a time, into a second batch id.
    seen: set[str] = set()
    ref_rows, ref_problems = [], []
    for line_no, raw in _lines(src):
        try:
            ref_rows.append(_parse(CONFIG, "ref", line_no, raw, seen))
        except Exception as e:  # LineProblem / RouteError
            ref_problems.append((line_no, str(e)))
    for i in range(0, len(ref_rows), 500):
        store.insert_jobs(ref_rows[i:i + 500])
    assert ref_problems == result.problems
    ours, ref = _rows(store, result.batch_id), _rows(store, "ref")
    assert ours.keys() == ref.keys()
    for cid, row in ours.items():
        other = ref[cid]
        assert {k: v for k, v in row.items() if k not in ("id", "batch_id")} == \
            {k: v for k, v in other.items() if k not in ("id", "batch_id")}
    assert ours["job-000003"]["options"]["metadata"] == {"n": 3, "tab": "a\tb",
                                                         "quote": "\\\"x\""}
    job = store.get_job(ours["job-000003"]["id"])
    assert job is not None and job.created_at is not None and job.created_at.tzinfo is not None

    # Resubmitting: nothing new stored, and only still-queued jobs published again.
    again = ingest_file(CONFIG, store, CeleryDispatcher(), src)
    assert again.batch_id == result.batch_id and again.jobs == result.jobs
    assert store.state_counts(result.batch_id) == {"queued": result.jobs}


def test_in_process_and_parallel_parsing_agree(tmp_path: Path) -> None:
    from batchroute.ingest import _lines

    src = classify_batch(tmp_path / "b.jsonl", 2100, dupes=5, bad=3)
    results = []
    for workers in (0, 2):
        store = Store()
        results.append(ingest_lines(CONFIG, store, None, f"b{workers}", _lines(src),
                                    workers=workers))
        assert store.state_counts(f"b{workers}") == {"queued": 2100}
    assert results[0].problems == results[1].problems
    assert results[0].jobs == results[1].jobs == 2100


@pytest.mark.integration
def test_client_jobs_with_clock_line_numbers_fit_the_store(start_worker: Any) -> None:
    """Client.enqueue numbers lines with a microsecond clock: BIGINT on PostgreSQL."""
    from batchroute import Client

    start_worker(concurrency=2)
    handle = Client.from_env().enqueue(messages=[{"role": "user", "content": "Say hi."}])
    assert handle.wait(timeout=60).content


# ---- Flower -----------------------------------------------------------------------------------
@pytest.fixture
def flower(redis_url: str, tmp_path: Path) -> Iterator[tuple[str, tuple[str, str], Path]]:
    """`celery -A workers flower` with basic auth (its API refuses anonymous callers)."""
    import httpx

    port, auth = free_port(), ("ops", "flower-test-pass")
    log_path = tmp_path / "flower.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers", "flower", f"--port={port}",
         "--address=127.0.0.1"],
        cwd=ROOT, env={**os.environ, "FLOWER_BASIC_AUTH": ":".join(auth)},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/api/queues/length", auth=auth, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 40, f"flower to answer; log:\n{log_path.read_text()[-2000:]}", 0.3)
        yield url, auth, log_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.mark.integration
def test_flower_shows_queue_depth_workers_and_tasks_with_ids_only(
        flower: tuple[str, tuple[str, str], Path], start_worker: Any, tmp_path: Path) -> None:
    import httpx

    url, auth, log_path = flower

    def get(path: str) -> Any:
        r = httpx.get(url + path, auth=auth, timeout=15)
        assert r.status_code == 200, r.text
        return r.json()

    # Jobs waiting and no worker yet: the pool's queue depth is visible.
    src = classify_batch(tmp_path / "b.jsonl", 30)
    res = CliRunner().invoke(main, ["submit", str(src), "--json"])
    assert res.exit_code == 0, res.output
    batch_id = json.loads(res.stdout)["batch_id"]
    lengths = {q["name"]: q["messages"] for q in get("/api/queues/length")["active_queues"]}
    assert lengths.get("batchroute.sim") == 30, lengths

    worker = start_worker(concurrency=8, queues="batchroute.sim,batchroute.sweep")
    store = Store()
    wait_for(lambda: _done(store, batch_id, 30), 120,
             f"the batch to finish; worker log:\n{worker.log()[-3000:]}")

    def worker_listed() -> bool:
        workers = get("/api/workers?refresh=1")
        return any(name.startswith("test") for name in workers)

    wait_for(worker_listed, 30, f"flower to list the worker; log:\n{log_path.read_text()[-2000:]}",
             1.0)
    workers = get("/api/workers")
    name = next(n for n in workers if n.startswith("test"))
    active = {q["name"] for q in workers[name].get("active_queues", [])}
    assert {"batchroute.sim", "batchroute.sweep"} <= active

    def tasks_seen() -> bool:
        tasks = get("/api/tasks?limit=1000")
        return sum(t.get("state") == "SUCCESS" for t in tasks.values()) >= 30

    wait_for(tasks_seen, 30, "flower to receive the task events", 0.5)
    tasks = get("/api/tasks?limit=1000")
    ours = [t for t in tasks.values() if t.get("name") == "batchroute.process_job"]
    assert len(ours) >= 30
    for t in ours:
        assert re.fullmatch(r"\['j[0-9a-f]{23}', \d+\]", t["args"]), t["args"]
        assert "Ticket" not in json.dumps(t)  # no prompt text anywhere in Flower
    lengths = {q["name"]: q["messages"] for q in get("/api/queues/length")["active_queues"]}
    assert lengths.get("batchroute.sim") == 0


# ---- metrics ----------------------------------------------------------------------------------
def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


@pytest.mark.integration
def test_metrics_endpoint_serves_queue_depth_jobs_and_pools(redis_url: str,
                                                           tmp_path: Path) -> None:
    import httpx

    src = classify_batch(tmp_path / "b.jsonl", 25)
    res = CliRunner().invoke(main, ["submit", str(src), "--json"])
    assert res.exit_code == 0, res.output
    batch_id = json.loads(res.stdout)["batch_id"]
    port = free_port()
    log_path = tmp_path / "metrics.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "batchroute.cli", "metrics", "--port",
                                 str(port)], cwd=ROOT, env=dict(os.environ), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def scrape() -> str | None:
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
                    return r.text if r.status_code == 200 else None
                except httpx.HTTPError:
                    return None

            wait_for(lambda: scrape() is not None, 30,
                     f"metrics to listen; log:\n{log_path.read_text()[-2000:]}", 0.3)
            text = scrape()
            assert text is not None
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
    s = _samples(text)
    assert s['batchroute_queue_messages{queue="batchroute.sim"}'] == 25
    assert s['batchroute_queue_messages{queue="batchroute.sweep"}'] == 0
    assert s["batchroute_queue_unacked_messages"] == 0
    assert s['batchroute_jobs{state="queued"}'] == 25
    assert s['batchroute_queue_jobs{queue="batchroute.sim"}'] == 25
    assert s['batchroute_queue_jobs{queue="batchroute.sweep"}'] == 0
    assert s[f'batchroute_batch_jobs{{batch_id="{batch_id}",state="queued"}}'] == 25
    assert s['batchroute_up{part="broker"}'] == s['batchroute_up{part="store"}'] == 1


def test_metrics_show_rate_limit_pools_and_survive_a_broker_down(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchroute.metrics import render

    cfg = tmp_path / "limited.toml"
    text = (ROOT / "batchroute" / "default.toml").read_text()
    cfg.write_text(text.replace('timeout_s = 30\n', 'timeout_s = 30\nrpm = 600\ntpm = 90000\n'
                                'max_concurrency = 7\n', 1))
    config = load_config(str(cfg))
    s = _samples(render(config))
    assert s['batchroute_pool_requests_limit{pool="sim"}'] == 600
    assert s['batchroute_pool_tokens_limit{pool="sim"}'] == 90000
    assert s['batchroute_pool_concurrency_limit{pool="sim"}'] == 7
    assert s['batchroute_pool_in_flight{pool="sim"}'] == 0
    assert s['batchroute_up{part="ratelimit"}'] == 1

    monkeypatch.setenv("BATCHROUTE_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    s = _samples(render(load_config()))
    assert s['batchroute_up{part="broker"}'] == 0
    assert s['batchroute_up{part="store"}'] == 1
    assert not any(k.startswith("batchroute_queue_messages") for k in s)


# ---- docker-compose ---------------------------------------------------------------------------
def _compose() -> dict[str, Any]:
    import yaml

    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    import jsonschema

    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator_cls(schema).iter_errors(_compose())]
    assert errors == []
    # The validator does catch mistakes (so the check above means something).
    broken = _compose()
    broken["services"]["worker-sim"]["comand"] = ["celery"]
    assert list(validator_cls(schema).iter_errors(broken))


def test_compose_runs_the_whole_stack() -> None:
    services = _compose()["services"]
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis_cmd and "--appendonly yes" in redis_cmd
    assert services["postgres"]["image"].startswith("postgres")
    assert "postgresql://" in services["worker-sim"]["environment"]["BATCHROUTE_DATABASE_URL"]
    assert "beat" in services["beat"]["command"]
    assert "flower" in services["flower"]["command"]
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    assert services["metrics"]["command"][:2] == ["batchroute", "metrics"]
    # One worker service per provider pool, each consuming its own queue.
    pools = load_config(str(ROOT / "jobs" / "providers.example.toml")).providers
    queues = {}
    for name, svc in services.items():
        cmd = svc.get("command") or []
        if name.startswith("worker-") and "-Q" in cmd:
            queues[name] = set(cmd[cmd.index("-Q") + 1].split(","))
    assert queues["worker-sim"] >= {"batchroute.sim", "batchroute.sweep"}
    for provider in pools.values():
        assert queues[f"worker-{provider.name}"] == {provider.queue}


def test_readme_explains_flower_metrics_and_scaling() -> None:
    readme = (ROOT / "README.md").read_text()
    for needle in ("celery -A workers flower", "batchroute metrics",
                   "docker compose up", "--scale worker-sim=4", "-Q batchroute.",
                   "BATCHROUTE_TEST_DATABASE"):
        assert needle in readme, needle


def test_example_file_fits_the_bulk_path(tmp_path: Path) -> None:
    """Every shipped example line goes through the bulk encoder (JSON columns, tabs and
    newlines in prompts, nulls) and decodes back to the row it came from."""
    from batchroute.ingest import _lines, _parse
    from batchroute.store.bulk import encode_job, finish_encode, pre_encode

    seen: set[str] = set()
    cols = [c.name for c in Job.__table__.columns]  # type: ignore[attr-defined]
    for line_no, raw in _lines(EXAMPLE):
        row = _parse(CONFIG, "b", line_no, raw, seen)
        full = encode_job(dict(row))
        assert full == finish_encode(pre_encode(dict(row)))
        fields = full.split("\t")
        assert len(fields) == len(cols)
        assert "\n" not in full


def test_task_events_reach_flower_in_batches(start_worker: Any, tmp_path: Path,
                                             redis_url: str) -> None:
    """Every task event still reaches the broker's event channel, but many share one
    publish (batchroute.worker_events) instead of one round trip each."""
    import redis

    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    pubsub.psubscribe("*celeryev*")
    src = classify_batch(tmp_path / "b.jsonl", 60)
    res = CliRunner().invoke(main, ["submit", str(src), "--json"])
    assert res.exit_code == 0, res.output
    batch_id = json.loads(res.stdout)["batch_id"]
    worker = start_worker(concurrency=16, BATCHROUTE_EVENT_FLUSH_S="0.5")
    store = Store()
    wait_for(lambda: _done(store, batch_id, 60), 120,
             f"the worker to run the batch; log:\n{worker.log()[-3000:]}")
    publishes = 0
    events: list[str] = []
    deadline = 1.5  # the last batch goes out within the flush interval
    while (msg := pubsub.get_message(timeout=deadline)) is not None:
        if msg["type"] != "pmessage" or not msg["channel"].endswith(b"task.multi"):
            continue
        envelope = json.loads(msg["data"])
        body = json.loads(base64.b64decode(envelope["body"]))
        publishes += 1
        events.extend(e["type"] for e in body)
    pubsub.close()
    succeeded = store.state_counts(batch_id).get("succeeded", 0)
    assert events.count("task-succeeded") + events.count("task-failed") >= 60
    assert events.count("task-started") >= 60 and succeeded > 50
    # Flushing at once (Celery's own way) gave 2.7 events a publish here; 0.5 s gives ~12.
    assert len(events) / publishes >= 4, (len(events), publishes)
