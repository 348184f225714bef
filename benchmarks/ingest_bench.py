"""Ingestion at scale: `batchroute submit` of a 100k-line file into PostgreSQL + Redis.

Generates a batch in a temporary directory (the example batch's 300 requests, each line
given its own custom_id and a unique prefix in its user message, so no token count or
schema check is served from a cache that a real batch would not hit), then, in one run:

* **ours**: `ingest_file` as `batchroute submit` calls it (forked parsers, COPY into
  PostgreSQL, one Redis pipeline of Celery messages per chunk), end to end: parsed,
  stored, enqueued; jobs/s, and peak RSS of this process and of its parser processes
  (``resource.getrusage``);
* **naive**: the same parsing and routing, one line at a time, the ORM's multi-row INSERT
  per 1,000 rows, and a loop of Celery ``apply_async`` (one message per job), on the first
  `--naive-lines` lines (the rate is per line, so a subset measures it; the full file
  would only take longer);
* a check that every job is stored once and on the queue once, and that submitting the
  file again adds nothing.

    python benchmarks/ingest_bench.py                  # 100,000 lines, naive on 20,000
    options: --lines N --naive-lines N --workers N --keep-db --json

Needs Redis on 127.0.0.1:6379 (uses db 12 and flushes it) and PostgreSQL on
127.0.0.1:5432 as user postgres (BATCHROUTE_BENCH_POSTGRES_URL to change; a fresh
database is created and dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "jobs" / "examples" / "support_batch.jsonl"
REDIS_URL = "redis://127.0.0.1:6379/12"
PG_ADMIN = os.environ.get("BATCHROUTE_BENCH_POSTGRES_URL",
                          "postgresql://postgres@127.0.0.1:5432/postgres")
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike"]


def make_batch(path: Path, n: int, seed: int = 1) -> Path:
    src = [json.loads(line) for line in EXAMPLE.read_text().splitlines() if line.strip()]
    rnd = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            obj = json.loads(json.dumps(src[i % len(src)]))
            obj["custom_id"] = f"{obj['custom_id']}-{i}"
            msg = obj["body"]["messages"][-1]
            msg["content"] = f"[ref {i}: {' '.join(rnd.choices(WORDS, k=6))}]\n{msg['content']}"
            f.write(json.dumps(obj, separators=(",", ":")) + "\n")
    return path


def pg_admin(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


def fresh_database(name: str) -> str:
    from sqlalchemy.engine import make_url

    pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    pg_admin(f'CREATE DATABASE "{name}"')
    return make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)


def rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kB on Linux


def cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def run_ours(path: Path, url: str, workers: int | None) -> dict[str, Any]:
    from batchroute.config import load_config
    from batchroute.dispatch import CeleryDispatcher
    from batchroute.ingest import ingest_file
    from batchroute.store import Store, get_engine

    if workers is not None:
        os.environ["BATCHROUTE_INGEST_WORKERS"] = str(workers)
    config, store, dispatcher = load_config(), Store(get_engine(url)), CeleryDispatcher()
    from batchroute.tokens import encoding

    encoding()  # loaded once here, inherited by the forked parsers (as `submit` does)
    cpu0, cpu0c = cpu_s(resource.RUSAGE_SELF), cpu_s(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = ingest_file(config, store, dispatcher, path)
    wall = time.perf_counter() - t0
    return {"jobs": result.jobs, "enqueued": result.enqueued, "bad_lines": result.problem_count,
            "seconds": round(wall, 2), "jobs_per_s": round(result.jobs / wall),
            "cpu_s_main": round(cpu_s(resource.RUSAGE_SELF) - cpu0, 1),
            "cpu_s_parsers": round(cpu_s(resource.RUSAGE_CHILDREN) - cpu0c, 1),
            "peak_rss_mb_main": round(rss_mb(resource.RUSAGE_SELF), 1),
            "peak_rss_mb_parser": round(rss_mb(resource.RUSAGE_CHILDREN), 1),
            "batch_id": result.batch_id}


def run_naive(path: Path, url: str, lines: int) -> dict[str, Any]:
    """What a straightforward implementation does: parse and route line by line, the ORM's
    executemany per 1,000 rows, then `apply_async` per job."""
    import itertools

    from batchroute.config import load_config
    from batchroute.ingest import _lines, _parse
    from batchroute.store import Store, get_engine
    from workers import process_job

    config, store = load_config(), Store(get_engine(url))
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    n = 0

    def flush() -> None:
        store.insert_jobs(rows)
        for row in rows:
            process_job.apply_async(args=[row["id"], 1],
                                    queue=config.providers[row["provider"]].queue)
        rows.clear()

    t0 = time.perf_counter()
    for line_no, raw in itertools.islice(_lines(path), lines):
        rows.append(_parse(config, "naive", line_no, raw, seen))
        n += 1
        if len(rows) >= 1000:
            flush()
    flush()
    wall = time.perf_counter() - t0
    return {"jobs": n, "seconds": round(wall, 2), "jobs_per_s": round(n / wall)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--naive-lines", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=None,
                    help="parser processes (default: as submit chooses)")
    ap.add_argument("--keep-db", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    os.environ["BATCHROUTE_BROKER_URL"] = REDIS_URL
    os.environ.setdefault("BATCHROUTE_LOG_LEVEL", "WARNING")
    sys.path.insert(0, str(ROOT))
    import redis

    from batchroute.logs import configure_logging

    configure_logging(level="WARNING")
    broker = redis.Redis.from_url(REDIS_URL)
    broker.flushdb()
    db = f"batchroute_bench_ingest_{os.getpid()}"
    url = fresh_database(db)
    cpu = platform.processor() or platform.machine()
    out: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs, {cpu}, Python "
                           f"{platform.python_version()}", "lines": a.lines}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            path = make_batch(Path(tmp) / "batch.jsonl", a.lines)
            out["file_mb"] = round(path.stat().st_size / 2**20, 1)
            out["generate_s"] = round(time.perf_counter() - t, 1)
            ours = run_ours(path, url, a.workers)
            messages = int(broker.llen("batchroute.sim"))
            from batchroute.recovery import RedisBrokerView

            held = RedisBrokerView(REDIS_URL).held(["batchroute.sim"], None) or set()
            queued = len(held)  # distinct (job, attempt) pairs over all (chunk) messages
            from batchroute.store import Store, get_engine

            store = Store(get_engine(url))
            stored = sum(store.state_counts(ours["batch_id"]).values())
            broker.flushdb()
            t = time.perf_counter()
            again = run_ours(path, url, a.workers)
            out["resubmit"] = {"jobs": again["jobs"], "seconds": round(time.perf_counter() - t, 2),
                               "stored_after": sum(store.state_counts(ours["batch_id"])
                                                   .values())}
            broker.flushdb()
            naive = run_naive(path, url, min(a.naive_lines, a.lines))
            out["naive_queued"] = int(broker.llen("batchroute.sim"))
    finally:
        broker.flushdb()
        if not a.keep_db:
            from batchroute import store as store_module

            for engine in list(store_module._engines.values()):
                engine.dispose()
            pg_admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    out |= {"ours": ours, "ours_stored": stored, "ours_queued": queued,
            "ours_messages": messages, "naive": naive,
            "speedup": round(ours["jobs_per_s"] / naive["jobs_per_s"], 1)}
    if a.json:
        print(json.dumps(out, indent=2))
        return
    print(f"machine: {out['machine']}; file {out['file_mb']} MB, {a.lines:,} lines")
    print(f"ours : {ours['jobs']:,} jobs in {ours['seconds']} s = {ours['jobs_per_s']:,} jobs/s "
          f"(stored {stored:,}, on the queue {queued:,} in {messages:,} messages); "
          f"CPU main {ours['cpu_s_main']} s, "
          f"parsers {ours['cpu_s_parsers']} s; peak RSS main {ours['peak_rss_mb_main']} MB, "
          f"parser {ours['peak_rss_mb_parser']} MB")
    print(f"naive: {naive['jobs']:,} jobs in {naive['seconds']} s = {naive['jobs_per_s']:,} "
          f"jobs/s (apply_async per job)")
    print(f"speed-up: x{out['speedup']}")
    r = out["resubmit"]
    print(f"resubmit: {r['jobs']:,} lines in {r['seconds']} s; jobs stored after: "
          f"{r['stored_after']:,}")


if __name__ == "__main__":
    main()
