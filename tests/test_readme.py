"""README.md's commands work as written, on a fresh machine (issue #17).

Every ```bash block of README.md is read and, when it can run here, run: in a clean venv
(`python -m venv`, then the README's own `pip install -e ...` from a copy of the
repository), in that copy's directory, with Redis and PostgreSQL available. The only
changes to the commands: placeholders become real values (`batch.jsonl` → an example
file, `BATCH` → the id `submit` printed), the broker URL points at this test's Redis
database and Flower's port at a free one, so that other suites on the machine are not
disturbed. Long-running commands (workers, beat, Flower) run in the background; Flower's
page is fetched with the README's credentials, then everything is stopped.

Blocks that cannot run here are skipped for a stated reason (Docker is not installed; the
test-suite block would run this test inside itself). The calibration block runs as
written on files of those names made from `tests/data/replay_tiny.*` (a labelled replay
file, its routing config, and its held-out questions as the batch). The report figures printed in
README's "What you get" must be those of the real quick-start run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import REDIS_URL, ROOT

# A fresh venv and pip installs from PyPI: minutes, more on a slow mirror.
pytestmark = [pytest.mark.readme, pytest.mark.timeout(1800)]

README = ROOT / "README.md"
BLOCK_RE = re.compile(r"```(?:bash|sh|shell|console)\n(.*?)```", re.S)
NOT_HERE = {  # a command prefix -> why a block holding it cannot run on the test machine
    "docker": "Docker is not installed on the test machine",
    "POSTGRES_PASSWORD=": "Docker Compose is not installed on the test machine",
    "python -m pytest": "the test suite itself (this test is part of it)",
    "chromium": "no browser on the test machine",
}
CALIBRATE = "batchroute --config models.toml calibrate"
BACKGROUND = ("celery -A workers worker", "celery -A workers beat")


def shell_blocks(text: str) -> list[str]:
    return BLOCK_RE.findall(text)


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, trailing `  # comments` dropped."""
    out, pending = [], ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        line = re.sub(r"\s+#(?:\s.*)?$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def why_not_here(cmds: list[str]) -> str | None:
    for cmd in cmds:
        for prefix, reason in NOT_HERE.items():
            if cmd.startswith(prefix) or f"&& {prefix}" in cmd:
                return reason
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_readme_blocks_parse() -> None:
    """Cheap, always: the blocks this test knows how to run are where it expects them."""
    blocks = [commands(b) for b in shell_blocks(README.read_text())]
    runnable = [b for b in blocks if why_not_here(b) is None]
    first = [b[0] for b in runnable]
    assert first[0].startswith("pip install -e . && batchroute run jobs/examples/")
    assert any(c.startswith("pip install -e '.[flower,postgres]'") for c in first)
    distributed = next(b for b in runnable if b[0].startswith("pip install -e '.[flower"))
    assert any("--port=5555" in c and "FLOWER_BASIC_AUTH=" in c for c in distributed)
    assert "batchroute.db" not in " ".join(distributed)  # not the quick start's database


class Machine:
    """A fresh venv and a copy of the repository, and the processes started from them."""

    def __init__(self, tmp: Path) -> None:
        self.repo = tmp / "repo"
        shutil.copytree(ROOT, self.repo, ignore=shutil.ignore_patterns(
            ".git", "*.db", "__pycache__", "*.egg-info", ".venv", "venv", ".mypy_cache",
            ".ruff_cache", ".pytest_cache", "out.jsonl", "errors.jsonl", "celerybeat-*"))
        venv = tmp / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("BATCHROUTE_", "VIRTUAL_ENV", "PYTHON"))}
        self.env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
                        VIRTUAL_ENV=str(venv), COLUMNS="200", PIP_DISABLE_PIP_VERSION_CHECK="1")
        self.background: list[subprocess.Popen[bytes]] = []
        self.subs: dict[str, str] = {"redis://127.0.0.1:6379/0": REDIS_URL}
        self.log = tmp / "background.log"

    def sub(self, cmd: str) -> str:
        cmd = cmd.replace("[BATCH]", "BATCH")
        for old, new in self.subs.items():
            cmd = re.sub(rf"(?<![\w.-]){re.escape(old)}(?![\w-])", new, cmd)
        return cmd

    def run(self, cmd: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        cmd = self.sub(cmd)
        if cmd.startswith("export "):
            key, _, value = cmd.removeprefix("export ").partition("=")
            self.env[key] = value
            return subprocess.CompletedProcess(cmd, 0, "", "")
        if cmd.startswith(BACKGROUND) or "celery -A workers flower" in cmd:
            with self.log.open("ab") as log:
                self.background.append(subprocess.Popen(
                    ["bash", "-c", f"exec {cmd}" if cmd.startswith("celery") else cmd],
                    cwd=self.repo, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True))
            return subprocess.CompletedProcess(cmd, 0, "", "")
        proc = subprocess.run(["bash", "-c", cmd], cwd=self.repo, env=self.env, text=True,
                              capture_output=True, timeout=timeout)
        assert proc.returncode == 0, f"`{cmd}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"`{cmd}`:\n{proc.stderr[-3000:]}"
        return proc

    def stop(self) -> None:
        for p in self.background:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.background:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        self.background.clear()


@pytest.fixture
def machine(tmp_path: Path, redis_url: str) -> Iterator[Machine]:
    m = Machine(tmp_path)
    try:
        yield m
    finally:
        m.stop()


def _table(text: str) -> dict[str, str]:
    """`key   value` rows of a report (README's block or the CLI's boxed table)."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^[\s│|]*([a-z][a-z ()]+?)\s*[│|]?\s+([$\d.,%-]+)\s*[│|]?\s*$", line)
        if m:
            rows[m.group(1).strip()] = m.group(2)
    return rows


def _calibration_files(repo: Path) -> None:
    """models.toml, train.jsonl and batch.jsonl, as the README's calibration block names
    them, from the tiny labelled replay file the replay tests use."""
    from batchroute.replay import load_records, write_records

    data = ROOT / "tests" / "data"
    records = load_records(data / "replay_tiny.jsonl")
    shutil.copy(data / "replay_tiny.jsonl", repo / "replay_tiny.jsonl")
    shutil.copy(data / "replay_tiny.toml", repo / "models.toml")
    write_records(repo / "train.jsonl", [r for r in records if r.id.startswith("tr-")])
    (repo / "batch.jsonl").write_text("".join(json.dumps({
        "custom_id": r.id, "body": {"model": "auto", "messages": r.messages},
        "batchroute": {"task": r.task}}) + "\n" for r in records if r.id.startswith("te-")))


def _flower_up(port: int) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/", auth=("admin", "change-me"), timeout=5)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "Flower did not answer on its port"
        time.sleep(1)
    assert "Flower" in r.text
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 401
    assert httpx.get(f"http://127.0.0.1:{port}/", auth=("admin", "wrong"),
                     timeout=5).status_code == 401


def test_every_runnable_readme_block_works_on_a_fresh_machine(machine: Machine) -> None:
    text = README.read_text()
    blocks = [commands(b) for b in shell_blocks(text)]
    machine.subs["batch.jsonl"] = "jobs/examples/small.jsonl"
    flower_port = _free_port()
    machine.subs["--port=5555"] = f"--port={flower_port}"
    ran, skipped = 0, []
    for cmds in blocks:
        reason = why_not_here(cmds)
        if reason is not None:
            skipped.append((cmds[0], reason))
            continue
        calibration = cmds[0].startswith(CALIBRATE)
        if calibration:
            _calibration_files(machine.repo)
            del machine.subs["batch.jsonl"]  # the block's own batch.jsonl, made above
        for cmd in cmds:
            # The costs block's BATCH: its run's batch, found by its file name.
            if "BATCH" in cmd and "BATCH" not in machine.subs:
                machine.subs["BATCH"] = "small.jsonl"
            if "status BATCH --watch" in cmd:
                proc = machine.run(cmd, timeout=180)
                assert "stalled" not in proc.stderr
                continue
            proc = machine.run(cmd)
            if "batchroute run jobs/examples/support_batch.jsonl" in cmd:
                shown = _table(text.split("## What you get", 1)[1].split("```", 2)[1])
                real = _table(proc.stdout)
                assert shown and {k: real.get(k) for k in shown} == shown, (shown, real)
                assert "answers are simulated" in proc.stderr
            if cmd.startswith("batchroute submit"):
                machine.subs["BATCH"] = proc.stdout.strip().splitlines()[-1]
                assert "already exists" not in proc.stderr, proc.stderr
            if "celery -A workers flower" in cmd:
                _flower_up(flower_port)
            if calibration and " run batch.jsonl" in cmd:
                assert "answers are replayed" in proc.stderr
                assert "job(s) failed" not in proc.stderr, proc.stderr
            ran += 1
        machine.subs.pop("BATCH", None)
        machine.subs["batch.jsonl"] = "jobs/examples/small.jsonl"
    assert ran >= 17, (ran, skipped)
    assert len(skipped) <= 3, skipped
