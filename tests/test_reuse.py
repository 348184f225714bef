"""Answer reuse (#18): the key (pure), and `batchroute run` reusing answers within a batch
and across batches, honouring --reuse / --no-reuse, configs and failed originals."""

from __future__ import annotations

import copy
import json
import time
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batchroute.cli import main
from batchroute.config import ConfigError, load_config, parse_config
from batchroute.embedded import run_file
from batchroute.reuse import ReuseSettings, config_digest, deterministic, reuse_key, settings_for
from batchroute.reuse_run import MAX_WAIT_S, wait_delay
from batchroute.store import Store, get_engine

CONFIG = load_config()
SETTINGS = settings_for(CONFIG)
PROFILE = CONFIG.task("classify")


def body(content: str = "Is the sky blue? Answer yes or no.", **params: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"model": "auto", "max_tokens": 5, "temperature": 0,
                         "messages": [{"role": "system", "content": "Answer yes or no."},
                                      {"role": "user", "content": content}]}
    b.update(params)
    return {k: v for k, v in b.items() if v is not None}


def key(b: dict[str, Any], options: dict[str, Any] | None = None, task: str = "classify",
        settings: ReuseSettings = SETTINGS) -> str | None:
    return reuse_key(b, options or {}, task, CONFIG.task(task), settings)


# ---- the key ------------------------------------------------------------------------------

def test_identical_requests_share_a_key_and_the_key_is_stable() -> None:
    k = key(body())
    assert k is not None and len(k) == 64
    assert key(body()) == k
    assert key(copy.deepcopy(body())) == k


@pytest.mark.parametrize("change", [
    {"content": "Is the sea blue? Answer yes or no."},  # the question
    {"model": "gpt-4o"},
    {"max_tokens": 6},
    {"top_p": 0.5},
    {"seed": 1},
    {"stop": ["\n"]},
    {"n": 2},
    {"response_format": {"type": "json_object"}},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"some_future_parameter": True},  # unknown parameters are assumed to matter
])
def test_what_changes_the_answer_changes_the_key(change: dict[str, Any]) -> None:
    params = dict(change)
    content = params.pop("content", "Is the sky blue? Answer yes or no.")
    assert key(body(content, **params)) != key(body())


def test_what_no_model_sees_does_not_change_the_key() -> None:
    k = key(body())
    assert key(body("  Is the sky blue? Answer yes or no.\n")) == k  # surrounding whitespace
    assert key(body(user="u-42", metadata={"x": "y"}, store=True)) == k  # not the answer's
    parts = body()
    parts["messages"][1]["content"] = [{"type": "text", "text": "Is the sky blue? "},
                                       {"type": "text", "text": "Answer yes or no."}]
    assert key(parts) == k  # text parts read as one string
    named = body()
    named["messages"][1]["name"] = None
    assert key(named) == k
    assert key(body(), {"metadata": {"team": "a"}}) == key(body(), {"metadata": {"team": "b"}})
    crlf, lf = body("line one\r\nline two"), body("line one\nline two")
    assert key(crlf) == key(lf)
    nfd, nfc = body("Cafe\u0301?"), body("Caf\u00e9?")
    assert key(nfd) == key(nfc)


def test_checks_task_namespace_and_config_models_are_part_of_the_key() -> None:
    k = key(body())
    assert key(body(), {"validators": [{"type": "choices", "choices": ["yes", "no"]}]}) != k
    assert key(body(), {"pin": "sim-large"}) != k
    assert key(body(), {"max_tier": 2}) != k
    assert key(body(), task="extract") != k  # another profile (rules)
    other_ns = ReuseSettings(SETTINGS.mode, "project-b", SETTINGS.config_digest)
    assert key(body(), settings=other_ns) != k
    data = tomllib.loads(resources.files("batchroute").joinpath("default.toml").read_text())
    data["models"]["sim-small"]["model"] = "another-small-model"
    changed = parse_config(data)
    assert config_digest(changed) != SETTINGS.config_digest
    assert key(body(), settings=settings_for(changed)) != k
    data = tomllib.loads(resources.files("batchroute").joinpath("default.toml").read_text())
    data["models"]["sim-small"]["price"] = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
    assert config_digest(parse_config(data)) == SETTINGS.config_digest  # a price is no answer


def test_only_deterministic_requests_have_a_key_unless_the_user_opts_in() -> None:
    assert deterministic(body()) and deterministic(body(temperature=0.0))
    assert not deterministic(body(temperature=None))  # absent: OpenAI's default is 1
    assert not deterministic(body(temperature=0.7)) and not deterministic(body(temperature=False))
    assert key(body(temperature=None)) is None
    assert key(body(temperature=0.7)) is None
    on = settings_for(CONFIG, "on")
    assert key(body(temperature=None), settings=on) is not None
    assert key(body(temperature=0.7), settings=on) != key(body(temperature=None), settings=on)
    assert key(body(), settings=settings_for(CONFIG, "off")) is None


def test_the_key_stays_cheap_on_hostile_input() -> None:
    huge = body("x" * 4_000_000)
    deep: Any = "leaf"
    for _ in range(60):  # what jobspec still lets through (MAX_LINE_DEPTH = 64)
        deep = {"d": deep}
    nested = body(tools=[{"type": "function", "function": {"name": "f", "parameters": deep}}])
    start = time.perf_counter()
    assert key(huge) != key(nested)
    assert time.perf_counter() - start < 1.0


def test_reuse_config_table_is_checked() -> None:
    data = tomllib.loads(resources.files("batchroute").joinpath("default.toml").read_text())
    data["reuse"] = {"mode": "on", "namespace": "team-a"}
    config = parse_config(data)
    assert config.reuse.mode == "on" and settings_for(config).namespace == "team-a"
    assert settings_for(config, "off").mode == "off"  # the command line wins
    for bad in ({"mode": "always"}, {"namespace": 3}, {"ttl": 1}):
        data["reuse"] = bad
        with pytest.raises(ConfigError, match="reuse"):
            parse_config(data)


def test_a_duplicate_polls_its_leader_with_a_bounded_backoff() -> None:
    delays = [wait_delay(n) for n in range(20)]
    assert delays[0] < 0.5 and delays == sorted(delays) and delays[-1] == MAX_WAIT_S


# ---- `batchroute run` -------------------------------------------------------------------

LABELS = ["billing", "bug", "other"]


def line(cid: str, content: str, temperature: float | None = 0, **extra: Any) -> str:
    """A classify line the simulator answers with one of LABELS."""
    b: dict[str, Any] = {"model": "auto", "max_tokens": 10, "messages": [
        {"role": "user", "content": f"{content}\n\nAnswer with one of: {', '.join(LABELS)}."}]}
    if temperature is not None:
        b["temperature"] = temperature
    options = {"task": "classify", "validators": [{"type": "choices", "choices": LABELS}]}
    return json.dumps({"custom_id": cid, "body": b, "batchroute": options | extra})


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def read(path: Path) -> dict[str, dict[str, Any]]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {r["custom_id"]: r for r in rows}


def answer(row: dict[str, Any]) -> str:
    return row["response"]["body"]["choices"][0]["message"]["content"]


@pytest.mark.integration  # runs on SQLite and on PostgreSQL (the reuse_key index, queries)
def test_run_answers_duplicates_once_within_and_across_batches(tmp_path: Path,
                                                               db_url: str) -> None:
    store = Store(get_engine(db_url))
    dup = "Ticket: my invoice is wrong."
    first = write(tmp_path / "first.jsonl", [
        *(line(f"d-{i}", dup) for i in range(5)),
        line("other-1", "Ticket: the app crashes."),
        line("other-2", "Ticket: I love it."),
    ])
    one = run_file(first, tmp_path / "out1.jsonl", config=CONFIG, store=store)
    r1, out1 = one.report, read(tmp_path / "out1.jsonl")
    assert r1["succeeded"] == 7
    assert r1["reuse"] == {"hits": 4, "within_batch": 4, "across_batches": 0,
                           "saved_usd": pytest.approx(r1["reuse"]["saved_usd"])}
    group = [out1[f"d-{i}"] for i in range(5)]
    paid = [g for g in group if g["batchroute"]["reused_from"] is None]
    assert len(paid) == 1 and paid[0]["batchroute"]["cost_usd"] > 0  # answered once
    leader = paid[0]["custom_id"]
    for g in group:
        assert answer(g) == answer(paid[0])
        if g is not paid[0]:
            assert g["batchroute"]["reused_from"] == {"custom_id": leader,
                                                      "batch_id": one.ingest.batch_id}
            assert g["batchroute"]["cost_usd"] == 0 and g["batchroute"]["attempts"] == 1
    assert r1["reuse"]["saved_usd"] == pytest.approx(4 * paid[0]["batchroute"]["cost_usd"])
    split = r1["savings_by_source"]
    assert split["batch_discount_usd"] == 0 and split["reuse_usd"] == r1["reuse"]["saved_usd"]
    assert split["routing_usd"] + split["reuse_usd"] == pytest.approx(r1["savings_usd"])
    from batchroute.html_report import render_html

    page = render_html(r1)
    assert "reused answers" in page and "answer reuse" in page

    # A later batch: the same requests under other custom_ids are answered from the store.
    second = write(tmp_path / "second.jsonl", [
        line("again-dup", dup),
        line("again-other", "Ticket: the app crashes."),
        line("new", "Ticket: where is my parcel?"),
    ])
    two = run_file(second, tmp_path / "out2.jsonl", config=CONFIG, store=store)
    r2, out2 = two.report, read(tmp_path / "out2.jsonl")
    assert r2["reuse"]["hits"] == 2 and r2["reuse"]["across_batches"] == 2
    assert out2["again-dup"]["batchroute"]["reused_from"] == {
        "custom_id": leader, "batch_id": one.ingest.batch_id}
    assert answer(out2["again-other"]) == answer(out1["other-1"])
    assert out2["new"]["batchroute"]["reused_from"] is None
    assert r2["cost_usd"] == pytest.approx(out2["new"]["batchroute"]["cost_usd"])

    # Another config's models: nothing crosses over.
    data = tomllib.loads(resources.files("batchroute").joinpath("default.toml").read_text())
    data["models"]["sim-small"]["model"] = "sim-small-v2"
    third = write(tmp_path / "third.jsonl", [line("other-config", dup)])
    three = run_file(third, tmp_path / "out3.jsonl", config=parse_config(data), store=store)
    assert three.report["reuse"]["hits"] == 0 and three.report["cost_usd"] > 0


def _run_cli(tmp_path: Path, name: str, lines: list[str], *flags: str) -> dict[str, Any]:
    src = write(tmp_path / f"{name}.jsonl", lines)
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(tmp_path / f"{name}.out"),
                                    "--json", *flags])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout[res.stdout.index("{"):])


def test_non_deterministic_requests_are_reused_only_with_the_reuse_flag(tmp_path: Path) -> None:
    same = "Ticket: refund please."
    r = _run_cli(tmp_path, "default", [line(f"a{i}", same, temperature=None) for i in range(3)])
    assert r["reuse"]["hits"] == 0 and r["succeeded"] == 3
    warm = "Ticket: the page is blank."
    r = _run_cli(tmp_path, "warm", [line(f"w{i}", warm, temperature=0.8) for i in range(3)])
    assert r["reuse"]["hits"] == 0
    r = _run_cli(tmp_path, "opted", [line(f"b{i}", same, temperature=None) for i in range(3)],
                 "--reuse")
    assert r["reuse"]["hits"] == 2


def test_no_reuse_turns_it_off_entirely(tmp_path: Path) -> None:
    same = "Ticket: password reset fails."
    r = _run_cli(tmp_path, "off", [line(f"n{i}", same) for i in range(3)], "--no-reuse")
    assert r["reuse"]["hits"] == 0 and r["attempts"] >= 3
    # Those answers have no key: a later run with reuse on does not find them either.
    r = _run_cli(tmp_path, "on", [line(f"m{i}", same) for i in range(2)])
    assert r["reuse"] == {"hits": 1, "within_batch": 1, "across_batches": 0,
                          "saved_usd": r["reuse"]["saved_usd"]}


def test_a_failed_original_lets_its_duplicates_run(tmp_path: Path) -> None:
    impossible = [{"type": "choices", "choices": ["no-model-says-this"]}]
    same = "Ticket: hello."
    src = write(tmp_path / "fail.jsonl",
                [line(f"f{i}", same, validators=impossible) for i in range(3)])
    start = time.monotonic()
    outcome = run_file(src, tmp_path / "fail.out", config=CONFIG,
                       store=Store(get_engine(f"sqlite:///{tmp_path / 'f.db'}")))
    assert time.monotonic() - start < 15
    rows = read(tmp_path / "fail.out")
    assert outcome.report["failed"] == 3 and outcome.report["reuse"]["hits"] == 0
    for row in rows.values():  # each ran (and paid) itself once the first had failed
        assert row["error"]["code"] and row["batchroute"]["attempts"] >= 1
        assert row["batchroute"]["cost_usd"] > 0 and row["batchroute"]["reused_from"] is None


@pytest.mark.integration  # SQLite and PostgreSQL: ALTER TABLE and a partial index on each
def test_an_older_database_gains_the_indexed_reuse_key(db_url: str) -> None:
    from sqlalchemy import create_engine, inspect, text

    from batchroute import store as store_module
    from batchroute.store import engine_url

    get_engine(db_url)
    old = create_engine(engine_url(db_url))
    with old.begin() as conn:  # as a batchroute from before #18 left it
        conn.execute(text("DROP INDEX ix_job_reuse"))
        conn.execute(text("ALTER TABLE job DROP COLUMN reuse_key"))
    assert "reuse_key" not in {c["name"] for c in inspect(old).get_columns("job")}
    with store_module._engines_lock:
        store_module._engines.pop(db_url).dispose()
    store = Store(get_engine(db_url))  # a newer batchroute opens it
    insp = inspect(old)
    assert "reuse_key" in {c["name"] for c in insp.get_columns("job")}
    assert any(i["name"] == "ix_job_reuse" and i["column_names"][0] == "reuse_key"
               for i in insp.get_indexes("job"))
    old.dispose()
    from batchroute.store import reuse as store_reuse

    assert store_reuse.peers(store, "k", "b", "j").source is None  # and it is usable


@pytest.mark.integration
def test_two_celery_workers_answer_a_duplicated_request_once(start_worker, tmp_path: Path,
                                                             db_url: str) -> None:
    from batchroute.store import FINISHED

    from .conftest import wait_for

    workers = [start_worker(concurrency=8) for _ in range(2)]
    same = "Ticket: charged twice this month."
    src = write(tmp_path / "celery.jsonl", [
        *(line(f"dup-{i}", same, temperature=None) for i in range(20)),
        *(line(f"u-{i}", f"Ticket number {i}: the app is slow.", temperature=None)
          for i in range(10))])
    res = CliRunner().invoke(main, ["submit", str(src), "--json", "--reuse"])
    assert res.exit_code == 0, res.output
    batch_id = json.loads(res.stdout)["batch_id"]
    store = Store(get_engine(db_url))

    def done() -> bool:
        counts = store.state_counts(batch_id)
        return sum(counts.get(s, 0) for s in FINISHED) >= 30

    wait_for(done, 60, "the batch to finish; worker logs:\n"
             + "\n".join(w.log()[-1500:] for w in workers))
    jobs = {j.custom_id: j for j in store.iter_jobs(batch_id)}
    attempts = store.attempts(batch_id)
    assert len(jobs) == 30 and all(j.state == "succeeded" for j in jobs.values())
    dup_ids = {j.id for cid, j in jobs.items() if cid.startswith("dup-")}
    paid = {a.job_id for a in attempts if a.job_id in dup_ids and a.outcome != "reused"}
    reused = [a for a in attempts if a.outcome == "reused"]
    assert len(paid) == 1  # one provider answer for the 20 identical requests
    assert len(reused) == 19 and {a.job_id for a in reused} == dup_ids - paid
    assert all(a.cost_usd == 0 for a in reused)
    answers = {json.dumps((jobs[c].result or {})["choices"]) for c in jobs
               if c.startswith("dup-")}
    assert len(answers) == 1
