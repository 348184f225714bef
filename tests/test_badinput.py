"""The bad-input corpus: every way a batch line can be wrong or hostile, each with its message,
and the good lines around it still completing.

The per-line cases go into one file, each bad line between two good ones, and run through
the embedded pipeline once (module fixture); each case then checks its own message and its
neighbours. Whole-file problems (empty, UTF-16, gzip), the 50 MB line, --strict and the
accepted oddities (BOM, CRLF, unknown reference model) have tests of their own.
"""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batchroute.cli import main
from batchroute.config import load_config
from batchroute.embedded import run_file
from batchroute.ingest import BatchInputError, ingest_file
from batchroute.store import SUCCEEDED, Store, get_engine

CONFIG = load_config()


def obj_line(custom_id: Any = "x", body: Any = ..., **extra: Any) -> bytes:
    line: dict[str, Any] = {"custom_id": custom_id, "method": "POST",
                            "url": "/v1/chat/completions"}
    if custom_id is None:
        del line["custom_id"]
    if body is ...:
        body = {"model": "auto", "messages": [{"role": "user", "content": "Say hi."}]}
    if body is not None:
        line["body"] = body
    for key, value in extra.items():
        if value is None:
            line.pop(key, None)
        else:
            line[key] = value
    return json.dumps(line).encode()


def msgs(content: Any = "Say hi.", role: str = "user") -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": role, "content": content}]}


HUGE_PROMPT = "lorem ipsum " * 70_000  # ~140k tokens: beyond every simulated model's window

# (case id, the bad line's bytes, what the error message must say)
CASES: list[tuple[str, bytes, str]] = [
    ("truncated-json", b'{"custom_id": "t1", "body": ', "invalid JSON: Expecting value"),
    ("trailing-garbage", obj_line("t2") + b" trailing", "invalid JSON: Extra data"),
    ("single-quotes", b"{'custom_id': 't3'}", "invalid JSON: Expecting property name"),
    ("json-array", b"[1, 2, 3]", "expected a JSON object, got list"),
    ("json-string", b'"just a string"', "expected a JSON object, got str"),
    ("json-null", b"null", "expected a JSON object, got NoneType"),
    ("binary-garbage", b"\x00\x01\x02\x03", "invalid JSON"),
    ("invalid-utf8", b'{"custom_id": "u\xff\xfe"}', "invalid UTF-8 at byte"),
    ("missing-custom-id", obj_line(None), "custom_id: required"),
    ("custom-id-number", obj_line(17), "custom_id: required, a non-empty string"),
    ("custom-id-blank", obj_line("   "), "custom_id: required, a non-empty string"),
    ("missing-body", obj_line("b1", None), "body: required, an object"),
    ("body-not-object", obj_line("b2", "hello"), "body: required, an object"),
    ("missing-messages", obj_line("m1", {"model": "auto"}), "body.messages: must be a non-empty"),
    ("empty-messages", obj_line("m2", {"messages": []}), "body.messages: must be a non-empty"),
    ("messages-not-list", obj_line("m3", {"messages": "hi"}), "body.messages: must be a non-empty"),
    ("message-not-object", obj_line("m4", {"messages": ["hi"]}),
     "body.messages[0]: must be an object"),
    ("bad-role", obj_line("m5", msgs(role="robot")), "body.messages[0].role: must be one of"),
    ("content-number", obj_line("m6", msgs(content=42)), "body.messages[0].content: must be"),
    ("model-number", obj_line("m7", {"model": 4, "messages": msgs()["messages"]}),
     "body.model: must be a string"),
    ("max-tokens-string", obj_line("m8", msgs() | {"max_tokens": "20"}),
     "body.max_tokens: must be a positive integer"),
    ("max-tokens-zero", obj_line("m9", msgs() | {"max_tokens": 0}),
     "body.max_tokens: must be a positive integer"),
    ("unsupported-url", obj_line("u1", url="/v1/embeddings"),
     "url: only /v1/chat/completions is supported"),
    ("unsupported-method", obj_line("u2", method="GET"), "method: only POST is supported"),
    ("prompt-over-every-context-window", obj_line("big", msgs(HUGE_PROMPT)),
     "exceeds every allowed model's context window"),
    ("unknown-task", obj_line("k1", batchroute={"task": "poetry"}),
     "batchroute.task: unknown task 'poetry'"),
    ("pin-naming-nothing", obj_line("k2", batchroute={"pin": "gpt-9-ultra"}),
     "batchroute.pin: 'gpt-9-ultra' is neither a configured model nor provider"),
    ("unknown-validator-type", obj_line("v1", batchroute={"validators": [{"type": "vibes"}]}),
     "batchroute.validators"),
    ("validator-unknown-custom-code",
     obj_line("v2", batchroute={"validators": [{"type": "custom", "name": "evil"}]}),
     "is not a known custom validator"),
    ("validator-dotted-path-code",
     obj_line("v3", batchroute={"validators": [{"type": "custom", "name": "os.system"}]}),
     "dotted paths are not accepted"),
    ("validators-not-list", obj_line("v4", batchroute={"validators": {"type": "json"}}),
     "batchroute.validators: must be a list"),
    ("batchroute-not-object", obj_line("o1", batchroute=[1]), "batchroute: must be an object"),
    ("max-tier-zero", obj_line("o2", batchroute={"max_tier": 0}),
     "batchroute.max_tier: must be a positive integer"),
    ("min-tier-above-max-tier", obj_line("o3", batchroute={"min_tier": 3, "max_tier": 1}),
     "no tier left"),
    ("metadata-not-object", obj_line("o4", batchroute={"metadata": "team-a"}),
     "batchroute.metadata: must be an object"),
    ("nested-too-deeply", b'{"custom_id": "h1", "body": ' + b"[" * 100_000 + b"]" * 100_000
     + b"}", "invalid JSON: nested too deeply"),
    ("integer-of-10k-digits", b'{"custom_id": "h2", "n": ' + b"9" * 10_000 + b"}",
     "Exceeds the limit (4300 digits)"),
    ("nan-temperature", obj_line("h3", msgs() | {"temperature": "NaN-PLACEHOLDER"})
     .replace(b'"NaN-PLACEHOLDER"', b"NaN"), "NaN is not valid JSON"),
    ("number-out-of-range", obj_line("h4", msgs() | {"temperature": "INF"})
     .replace(b'"INF"', b"1e999"), "a number is out of range"),
    ("lone-surrogate", obj_line("h5", msgs("\\ud800 hi")).replace(b"\\\\ud800", b"\\ud800"),
     "lone surrogate"),
    ("line-over-8mb", b'{"custom_id": "long", "pad": "' + b"x" * (9 * 1024 * 1024) + b'"}',
     "longer than 8 MB"),
]
DUPLICATE = "duplicate-custom-id"


def good(case: str, side: str) -> bytes:
    return obj_line(f"ok-{case}-{side}", msgs(f"Write one friendly sentence about {case}."))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One file: for every case a good line, the bad line, a good line; run end to end."""
    tmp = tmp_path_factory.mktemp("badinput")
    lines: list[bytes] = []
    where: dict[str, int] = {}
    for case, bad, _ in CASES:
        lines.append(good(case, "a"))
        lines.append(bad)
        where[case] = len(lines)
        lines.append(good(case, "b"))
    lines.append(good(DUPLICATE, "a"))
    lines.append(obj_line(f"ok-{DUPLICATE}-a", msgs("A second line with the same custom_id.")))
    where[DUPLICATE] = len(lines)
    lines.append(good(DUPLICATE, "b"))
    src = tmp / "corpus.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    store = Store(get_engine(f"sqlite:///{tmp / 'corpus.db'}"))
    out, err = tmp / "out.jsonl", tmp / "err.jsonl"
    outcome = run_file(src, out, err, CONFIG, store=store)
    errors = [json.loads(x) for x in err.read_text().splitlines()]
    results = {r["custom_id"]: r for x in out.read_text().splitlines()
               for r in [json.loads(x)]}
    return {"where": where, "errors": errors, "results": results, "outcome": outcome,
            "store": store, "batch_id": outcome.ingest.batch_id}


def _line_error(corpus: dict[str, Any], line_no: int) -> dict[str, Any]:
    found = [e for e in corpus["errors"] if e["error"].get("line") == line_no]
    assert len(found) == 1, f"expected one error for line {line_no}, got {found}"
    return found[0]


@pytest.mark.parametrize(("case", "expected"), [(c, m) for c, _, m in CASES]
                         + [(DUPLICATE, "custom_id: duplicate 'ok-duplicate-custom-id-a'")],
                         ids=[c for c, _, _ in CASES] + [DUPLICATE])
def test_bad_line_is_reported_and_its_neighbours_complete(corpus: dict[str, Any], case: str,
                                                          expected: str) -> None:
    line_no = corpus["where"][case]
    err = _line_error(corpus, line_no)
    assert err["response"] is None and err["error"]["code"] == "invalid_line"
    assert err["error"]["message"].startswith(f"line {line_no}: ")
    assert expected in err["error"]["message"]
    assert len(err["error"]["message"]) < 1000  # never echoes a 9 MB line back
    for side in ("a", "b"):
        result = corpus["results"].get(f"ok-{case}-{side}")
        assert result is not None, f"good line ok-{case}-{side} did not complete"
        assert result["response"]["status_code"] == 200


def test_corpus_totals(corpus: dict[str, Any]) -> None:
    n_bad = len(CASES) + 1
    assert len(CASES) >= 30
    ingest = corpus["outcome"].ingest
    assert ingest.problem_count == n_bad
    assert ingest.jobs == 2 * n_bad  # every good line, and the first of the duplicates
    assert corpus["outcome"].report["succeeded"] == 2 * n_bad
    assert len(corpus["errors"]) == n_bad


# ---- accepted oddities -------------------------------------------------------------------
def _run(tmp_path: Path, data: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                               dict[str, Any]]:
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    store = Store(get_engine(f"sqlite:///{tmp_path / 'odd.db'}"))
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    outcome = run_file(src, out, err, CONFIG, store=store)
    return _read(out), _read(err), outcome.report


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_bom_crlf_blank_lines_and_no_final_newline_are_accepted(tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    data = (bom + good("bom", "a") + b"\r\n" + b"\r\n   \r\n" + good("crlf", "a") + b"\r\n"
            + bom + good("cat-bom", "a") + b"\n" + good("last", "a"))
    out, err, report = _run(tmp_path, data)
    assert err == []
    assert sorted(r["custom_id"] for r in out) == [
        "ok-bom-a", "ok-cat-bom-a", "ok-crlf-a", "ok-last-a"]
    assert report["bad_lines"] == 0


def test_a_reference_model_nobody_prices_is_accepted_and_reported_unpriced(
        tmp_path: Path) -> None:
    # Decision: body.model naming a model neither the catalog nor genai-prices knows (a
    # fine-tune, a private deployment) is a valid request; the job routes as usual, and the
    # report counts it in unpriced_reference_jobs instead of guessing its baseline.
    unknown = obj_line("ft-1", {"model": "ft:my-private-model-xyz", "messages": [
        {"role": "user", "content": "Say hi."}]})
    known = obj_line("ref-1", {"model": "gpt-4o", "messages": [
        {"role": "user", "content": "Say hello."}]})
    out, err, report = _run(tmp_path, unknown + b"\n" + known + b"\n")
    assert err == [] and len(out) == 2
    assert report["unpriced_reference_jobs"] == 1
    assert report["baseline_cost_usd"] > 0
    ft = next(r for r in out if r["custom_id"] == "ft-1")
    assert ft["batchroute"]["reference_model"] == "ft:my-private-model-xyz"


# ---- whole-file problems -----------------------------------------------------------------
@pytest.mark.parametrize(("data", "expected"), [
    (b"", "is empty"),
    (b"\n\n   \r\n\t\n", "is empty"),
    (b"\xef\xbb\xbf", "is empty"),
    ("\ufeff".encode("utf-16") + '{"custom_id": "a"}\n'.encode("utf-16-le"), "UTF-16"),
    (gzip.compress(b'{"custom_id": "a"}\n'), "gzip-compressed"),
], ids=["empty", "whitespace-only", "bom-only", "utf-16", "gzip"])
def test_a_file_that_cannot_be_read_is_refused_whole(tmp_path: Path, data: bytes,
                                                     expected: str) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    store = Store(get_engine(f"sqlite:///{tmp_path / 'w.db'}"))
    with pytest.raises(BatchInputError, match=expected):
        ingest_file(CONFIG, store, None, src)
    assert store.find_batch("b") is None  # nothing stored
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code != 0 and expected in res.output
    assert not (tmp_path / "o.jsonl").exists()


def test_a_50mb_line_is_skipped_without_being_loaded(tmp_path: Path) -> None:
    src = tmp_path / "huge.jsonl"
    with src.open("wb") as f:
        f.write(good("before", "a") + b"\n")
        f.write(b'{"custom_id": "huge", "body": {"messages": [{"role": "user", "content": "')
        chunk = b"y" * (1 << 20)
        for _ in range(50):
            f.write(chunk)
        f.write(b'"}]}}\n')
        f.write(good("after", "a") + b"\n")
    assert src.stat().st_size > 50 * 2**20
    store = Store(get_engine(f"sqlite:///{tmp_path / 'h.db'}"))
    tracemalloc.start()
    try:
        result = ingest_file(CONFIG, store, None, src)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 24 * 2**20, f"ingest peaked at {peak / 2**20:.1f} MB for a 50 MB line"
    assert result.problems == [(2, result.problems[0][1])]
    assert result.problems[0][1].startswith("longer than 8 MB")
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    run_file(src, out, err, CONFIG, store=store)
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == [
        "ok-before-a", "ok-after-a"]
    [e] = [json.loads(x) for x in err.read_text().splitlines()]
    assert e["error"]["message"].startswith("line 2: longer than 8 MB")


# ---- --strict ----------------------------------------------------------------------------
def _strict_file(tmp_path: Path) -> Path:
    src = tmp_path / "strict.jsonl"
    src.write_bytes(good("s", "1") + b"\n" + good("s", "2") + b"\n"
                    + obj_line("s3", {"messages": []}) + b"\n" + good("s", "4") + b"\n")
    return src


def test_run_strict_refuses_the_whole_file(tmp_path: Path) -> None:
    src = _strict_file(tmp_path)
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(out), "--strict"])
    assert res.exit_code == 1
    assert "strict.jsonl line 3: body.messages: must be a non-empty list" in res.output
    assert "nothing was stored or enqueued" in res.output
    assert not out.exists()
    store = Store()
    from batchroute.ingest import file_batch_id

    assert store.get_batch(file_batch_id(src)) is None
    assert store.state_counts(file_batch_id(src)) == {}


def test_submit_strict_refuses_the_whole_file_and_enqueues_nothing(tmp_path: Path,
                                                                   redis_url: str) -> None:
    import redis

    src = _strict_file(tmp_path)
    res = CliRunner().invoke(main, ["submit", str(src), "--strict"])
    assert res.exit_code == 1 and "line 3: body.messages" in res.output
    assert redis.Redis.from_url(redis_url).llen("batchroute.sim") == 0
    from batchroute.ingest import file_batch_id

    assert Store().get_batch(file_batch_id(src)) is None
    # Without --strict the same file goes in, the bad line reported.
    res = CliRunner().invoke(main, ["submit", str(src), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert (data["jobs"], data["bad_lines"], data["enqueued"]) == (3, 1, 3)


def test_strict_accepts_a_clean_file(tmp_path: Path) -> None:
    src = tmp_path / "clean.jsonl"
    src.write_bytes(good("c", "1") + b"\n" + good("c", "2") + b"\n")
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(out), "--strict", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["succeeded"] == 2
    assert all(json.loads(x)["response"]["status_code"] == 200
               for x in out.read_text().splitlines())
    assert Store().state_counts(json.loads(res.stdout)["batch_id"]) == {SUCCEEDED: 2}
