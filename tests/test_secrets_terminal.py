"""Secrets and terminals (#15): an API key echoed by a provider, or loaded with a trailing
newline, appears nowhere (database, results/errors files, logs, CLI output); text from
outside (custom_id, batch name, error messages) never reaches a terminal raw."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import create_engine, text

from batchroute import secrets, terminal
from batchroute.config import ProviderConfig
from batchroute.providers import ProviderError, call
from batchroute.store import engine_url

from .conftest import ROOT, wait_for
from .echo_server import echo_server

BATCHROUTE = str(Path(os.environ.get("VIRTUAL_ENV", "/work/venv")) / "bin" / "batchroute")


def _config(path: Path, base_url: str, key_env: str) -> Path:
    path.write_text(f"""
[providers.echo]
kind = "openai"
base_url = "{base_url}"
api_key_env = "{key_env}"
timeout_s = 10

[models.echo-small]
provider = "echo"
api_model = "echo-small"
tier = 1
price = {{ input_per_mtok = 1.0, output_per_mtok = 2.0 }}

[tasks.default]
ladder = [1]
validators = [{{ type = "non_empty" }}]
""")
    return path


def _batch(path: Path, custom_ids: list[str], prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"custom_id": c, "body": {
        "model": "auto", "max_tokens": 5, "messages": [{"role": "user", "content": p}]}}) + "\n"
        for c, p in zip(custom_ids, prompts, strict=True)))
    return path


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BATCHROUTE, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def _dump_tables(db_url: str) -> str:
    """Every row of every table, as text."""
    engine = create_engine(engine_url(db_url))
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                names = [r[0] for r in conn.execute(text(
                    "SELECT name FROM sqlite_master WHERE type='table'"))]
            else:
                names = [r[0] for r in conn.execute(text(
                    "SELECT tablename FROM pg_tables WHERE schemaname='public'"))]
            assert "job" in names and "attempt" in names, names
            return "\n".join(repr(row) for n in names
                             for row in conn.execute(text(f'SELECT * FROM "{n}"')))
    finally:
        engine.dispose()


@pytest.mark.integration
def test_canary_key_echoed_by_the_provider_appears_nowhere(db_url: str, tmp_path: Path) -> None:
    token = uuid.uuid4().hex
    key = f"sk-canary-{token}"
    with echo_server() as base_url:
        cfg = _config(tmp_path / "cfg.toml", base_url, "CANARY_API_KEY")
        src = _batch(tmp_path / "in.jsonl", ["ok-1", "auth-1", "bad-1"],
                     ["say yes", "auth please", "bad please"])
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BATCHROUTE_DATABASE_URL": db_url,
               "CANARY_API_KEY": key + "\n",  # a trailing newline: must still work
               "BATCHROUTE_CONFIG": str(cfg), "BATCHROUTE_LOG_LEVEL": "DEBUG"}
        out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
        outputs = []
        for fmt in ("json", "console"):
            run = _cli(["-v", "run", str(src), "-o", str(out), "--errors", str(err), "--json"],
                       {**env, "BATCHROUTE_LOG_FORMAT": fmt})
            assert run.returncode == 0, run.stderr[-3000:]
            outputs += [run.stdout, run.stderr]
        batch_id = json.loads(outputs[0])["batch_id"]
        for args in (["status", batch_id], ["status", batch_id, "--json"],
                     ["report", batch_id], ["report", batch_id, "--json"],
                     ["results", batch_id, "-o", str(tmp_path / "r.jsonl"),
                      "--errors", str(tmp_path / "re.jsonl")]):
            res = _cli(args, env)
            assert res.returncode == 0, (args, res.stderr[-2000:])
            outputs += [res.stdout, res.stderr]

    good = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["custom_id"] for g in good] == ["ok-1"]  # the stripped key was accepted
    errors = {e["custom_id"]: e["error"] for e in map(json.loads, err.read_text().splitlines())}
    assert set(errors) == {"auth-1", "bad-1"}
    # The echo happened and was redacted (so the test would see a leak):
    assert "[REDACTED]" in errors["auth-1"]["message"], errors
    assert "[REDACTED]" in errors["bad-1"]["message"], errors
    everything = "\n".join([*outputs, out.read_text(), err.read_text(),
                            (tmp_path / "r.jsonl").read_text(), (tmp_path / "re.jsonl").read_text(),
                            _dump_tables(db_url)])
    assert token not in everything
    assert "attempt" in everything  # logs were captured at DEBUG/INFO


def test_keys_are_stripped_and_every_variant_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    token = uuid.uuid4().hex
    key = f"k-{token}+/"
    monkeypatch.setenv("SOME_PROVIDER_KEY", key + "\n")
    assert secrets.api_key("SOME_PROVIDER_KEY") == key
    assert secrets.api_key("UNSET_KEY_VARIABLE") is None
    for echo in (key, repr(key + "\n"), json.dumps(key + "\n"), f"b'Bearer {key}\\n'",
                 quote(key, safe="")):
        assert token not in secrets.redact(f"Illegal header value {echo}"), echo
    # Shapes of keys nobody configured here are redacted too.
    for shape in ("sk-proj-abcdefghijklmnop", "sk-ant-api03-abcdefgh_ij", "Bearer xyz.abc.def"):
        assert secrets.redact(f"got {shape} ok") == "got " + (
            "Bearer [REDACTED]" if shape.startswith("Bearer") else "[REDACTED]") + " ok"
    assert secrets.redact("an ordinary sentence, no key") == "an ordinary sentence, no key"


def test_a_key_httpx_refuses_is_not_quoted_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A newline inside the key (strip cannot help): httpx's error quotes the header."""
    token = uuid.uuid4().hex
    monkeypatch.setenv("BROKEN_API_KEY", f"sk-{token[:8]}\nsk-{token[8:]}")
    provider = ProviderConfig(name="echo", kind="openai", base_url="",
                              api_key_env="BROKEN_API_KEY", timeout_s=5)
    with (echo_server() as base_url, httpx.Client() as client,
          pytest.raises(ProviderError) as info):
        call(client, provider, base_url, "m", {"messages": [{"role": "user", "content": "hi"}]})
    assert token[:8] not in str(info.value) and token[8:] not in str(info.value)


def test_terminal_escape_defuses_control_sequences() -> None:
    hostile = "id\x1b[2J\x1b]0;pwned\x07\x9b31m\u202egnp.exe\nnext"
    safe = terminal.escape(hostile)
    assert not any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f or c == "\u202e" for c in safe)
    assert safe == "id\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\u202egnp.exe\\x0anext"
    assert terminal.escape("a\nb", multiline=True) == "a\nb"
    assert terminal.for_rich("[red]x[/red]") == "\\[red]x\\[/red]"


def test_ansi_in_custom_id_and_batch_name_is_escaped_on_the_terminal(
        db_url: str, tmp_path: Path) -> None:
    with echo_server() as base_url:
        cfg = _config(tmp_path / "cfg.toml", base_url, "ECHO_API_KEY")
        evil = "\x1b[2J\x1b]0;owned\x07"
        src = _batch(tmp_path / "in.jsonl", [f"a{evil}", f"b{evil}"],
                     ["say yes", f"bad {evil}"])
        src.write_text(src.read_text() + "{not json " + evil + "\n")  # a bad line too
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BATCHROUTE_DATABASE_URL": db_url,
               "ECHO_API_KEY": "sk-test-0123456789", "BATCHROUTE_CONFIG": str(cfg),
               "BATCHROUTE_LOG_FORMAT": "console", "BATCHROUTE_LOG_LEVEL": "DEBUG"}
        run = _cli(["-v", "run", str(src), "-o", str(tmp_path / "o.jsonl")], env)
        assert run.returncode == 0, run.stderr[-3000:]
        other = _batch(tmp_path / "other.jsonl", [f"c{evil}"], ["say yes"])
        sub = _cli(["submit", str(other), "--name", f"name{evil}[red]x", "--json"],
                   {**env, "BATCHROUTE_BROKER_URL": "memory://"})
        assert sub.returncode == 0, sub.stderr[-2000:]
        batch_id = json.loads(sub.stdout)["batch_id"]
        shown = [run.stdout, run.stderr, sub.stderr]
        for args in (["status", batch_id], ["report", batch_id]):
            res = _cli(args, {**env, "COLUMNS": "300"})
            assert res.returncode == 0, (args, res.stderr[-2000:])
            shown += [res.stdout, res.stderr]
    text_shown = "\n".join(shown)
    assert "\x1b" not in text_shown and "\x07" not in text_shown
    assert "\\x1b[2J" in text_shown  # shown, visibly escaped
    assert "name\\x1b[2J" in text_shown and "[red]x" in text_shown  # markup not interpreted


@pytest.mark.integration
def test_canary_key_never_leaves_a_celery_worker(db_url: str, tmp_path: Path,
                                                 start_worker: Any) -> None:
    """The distributed path: a real worker's log (its own lines and Celery's), the rows
    it writes and the results CLI."""
    from batchroute.store import FINISHED, Store, get_engine

    token = uuid.uuid4().hex
    with echo_server() as base_url:
        cfg = _config(tmp_path / "cfg.toml", base_url, "CANARY_API_KEY")
        src = _batch(tmp_path / "in.jsonl", [f"ok-{i}" for i in range(4)] + ["auth-1", "bad-1"],
                     ["say yes"] * 4 + ["auth please", "bad please"])
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BATCHROUTE_DATABASE_URL": db_url,
               "CANARY_API_KEY": f"sk-canary-{token}\n", "BATCHROUTE_CONFIG": str(cfg),
               "BATCHROUTE_LOG_LEVEL": "DEBUG"}
        worker = start_worker(concurrency=2, **{k: env[k] for k in (
            "CANARY_API_KEY", "BATCHROUTE_CONFIG", "BATCHROUTE_LOG_LEVEL",
            "BATCHROUTE_DATABASE_URL")})
        sub = _cli(["submit", str(src), "--json"], env)
        assert sub.returncode == 0, sub.stderr[-2000:]
        batch_id = json.loads(sub.stdout)["batch_id"]
        store = Store(get_engine(db_url))

        def done() -> bool:
            counts = store.state_counts(batch_id)
            return sum(counts.get(s, 0) for s in FINISHED) == 6

        wait_for(done, 60, f"the batch; worker log:\n{worker.log()[-3000:]}")
        res = _cli(["results", batch_id, "-o", str(tmp_path / "o.jsonl"),
                    "--errors", str(tmp_path / "e.jsonl")], env)
        assert res.returncode == 0, res.stderr[-2000:]
    errors = (tmp_path / "e.jsonl").read_text()
    assert errors.count("[REDACTED]") >= 2, errors
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 4
    everything = "\n".join([worker.log(), sub.stdout, sub.stderr, res.stdout, res.stderr,
                            errors, (tmp_path / "o.jsonl").read_text(), _dump_tables(db_url)])
    assert token not in everything
    assert "attempt" in worker.log()
