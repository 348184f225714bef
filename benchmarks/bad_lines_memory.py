"""Peak memory of `run`, `status` and `results` on a file of a million bad lines, and of
`run` on lines just under the 8 MB line cap (issue #15, "the environment").

Generates, in a temporary directory (nothing is kept): a file of `--lines` bad lines of
ten kinds (invalid JSON, no custom_id, a bad role, an unknown task, a NUL character, a
backreference pattern, a remote schema $ref, deep nesting, a 600-character custom_id,
a duplicate custom_id) with a few good lines among them; and a file of `--big-lines`
requests of ~7.9 MB each with a few good lines. Each command runs as the `batchroute`
CLI in a subprocess on its own SQLite file; its peak RSS is sampled every 20 ms over the
whole process tree (the CLI and any parser processes it forks: their PSS summed, so
pages shared after fork count once; and the CLI's own RSS), and the lines it
prints are counted (a million bad lines must not mean a million warnings).

    python benchmarks/bad_lines_memory.py                 # 1,000,000 bad lines, 3 big lines
    options: --lines N --big-lines N --json

Needs Redis on 127.0.0.1:6379 for `status` (which shows the pools; db 12).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"model": "auto", "messages": [{"role": "user", "content": "Say hi."}]}


def bad_line(i: int) -> bytes:
    kind = i % 10
    if kind == 0:
        return b'{"custom_id": "t%d", "body": ' % i
    if kind == 1:
        return b'{"body": {"messages": []}}'
    if kind == 2:
        return b'{"custom_id": "r%d", "body": {"messages": [{"role": "robot", "content": "x"}]}}' % i
    if kind == 3:
        return (b'{"custom_id": "k%d", "body": {"messages": [{"role": "user", "content": "x"}]},'
                b' "batchroute": {"task": "poetry"}}' % i)
    if kind == 4:
        return b'{"custom_id": "z%d", "body": {"messages": [{"role": "user", "content": "a\\u0000"}]}}' % i
    if kind == 5:
        return (b'{"custom_id": "p%d", "body": {"messages": [{"role": "user", "content": "x"}]},'
                b' "batchroute": {"validators": [{"type": "regex", "pattern": "(a+)\\\\1"}]}}' % i)
    if kind == 6:
        return (b'{"custom_id": "s%d", "body": {"messages": [{"role": "user", "content": "x"}]},'
                b' "batchroute": {"validators": [{"type": "json_schema", "schema": '
                b'{"$ref": "http://127.0.0.1:9/x"}}]}}' % i)
    if kind == 7:
        return b'{"custom_id": "n%d", "x": ' % i + b"[" * 80 + b"]" * 80 + b"}"
    if kind == 8:
        return b'{"custom_id": "%s", "body": {}}' % (b"c%d-" % i + b"c" * 600)
    return b'{"custom_id": "dup", "body": {"messages": [{"role": "user", "content": "x"}]}}'


def write_bad_file(path: Path, n: int) -> None:
    with path.open("wb") as f:
        f.write(json.dumps({"custom_id": "dup", "body": GOOD}).encode() + b"\n")
        for i in range(n):
            f.write(bad_line(i) + b"\n")
            if i % 200_000 == 0:
                f.write(json.dumps({"custom_id": f"good-{i}", "body": GOOD}).encode() + b"\n")


def write_big_file(path: Path, n: int) -> None:
    size = 8 * 1024 * 1024 - 64 * 1024  # just under the 8 MB cap
    with path.open("wb") as f:
        f.write(json.dumps({"custom_id": "good-0", "body": GOOD}).encode() + b"\n")
        for i in range(n):
            head = b'{"custom_id": "big-%d", "body": {"model": "auto", "messages": ' % i
            head += b'[{"role": "user", "content": "'
            tail = b'"}]}}\n'
            f.write(head + b"lorem ipsum " * ((size - len(head) - len(tail)) // 12) + tail)
        f.write(json.dumps({"custom_id": "good-1", "body": GOOD}).encode() + b"\n")


def _tree_rss(pid: int) -> tuple[int, int]:
    """(PSS of `pid` and all its descendants, RSS of `pid` alone), bytes. PSS splits
    pages shared after fork between the processes, so the sum counts them once."""
    total, own, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for row in f:
                    if row.startswith("Pss:"):
                        total += int(row.split()[1]) * 1024
            if p == pid:
                with open(f"/proc/{p}/status") as f:
                    for row in f:
                        if row.startswith("VmRSS:"):
                            own = int(row.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total, own


def measure(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run the CLI; peak tree RSS (MB), seconds, lines printed, exit code."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "batchroute.cli", *args], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = [0, 0]

    def sample() -> None:
        while proc.poll() is None:
            tree, own = _tree_rss(proc.pid)
            peak[0], peak[1] = max(peak[0], tree), max(peak[1], own)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    text = out.decode("utf-8", "replace")
    return {"cmd": " ".join(["batchroute", *args[:1]]), "peak_pss_tree_mb": round(peak[0] / 2**20),
            "peak_rss_cli_mb": round(peak[1] / 2**20),
            "seconds": round(time.monotonic() - started, 1), "lines_printed": text.count("\n"),
            "exit": proc.returncode, "tail": text[-400:] if proc.returncode else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--big-lines", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="badlines-") as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BATCHROUTE_LOG_FORMAT": "console",
               "BATCHROUTE_BROKER_URL": "redis://127.0.0.1:6379/12",
               "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "120"}
        env.pop("BATCHROUTE_CONFIG", None)
        if a.lines:
            bad = tmp / "bad.jsonl"
            write_bad_file(bad, a.lines)
            env["BATCHROUTE_DATABASE_URL"] = f"sqlite:///{tmp / 'bad.db'}"
            from batchroute.ingest import file_batch_id

            batch = file_batch_id(bad)
            for label, cmd in (
                    ("run", ["run", str(bad), "-o", str(tmp / "o.jsonl"),
                             "--errors", str(tmp / "e.jsonl")]),
                    ("status", ["status", batch, "--json"]),
                    ("results", ["results", batch, "-o", str(tmp / "r.jsonl"),
                                 "--errors", str(tmp / "re.jsonl")])):
                row = measure(cmd, env)
                row.update(file=f"{a.lines:,} bad lines ({bad.stat().st_size / 2**20:.0f} MB)",
                           step=label)
                if label == "results":
                    row["error_lines_written"] = sum(1 for _ in (tmp / "re.jsonl").open("rb"))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
        if a.big_lines:
            big = tmp / "big.jsonl"
            write_big_file(big, a.big_lines)
            env["BATCHROUTE_DATABASE_URL"] = f"sqlite:///{tmp / 'big.db'}"
            row = measure(["run", str(big), "-o", str(tmp / "bo.jsonl")], env)
            row.update(file=f"{a.big_lines} lines of 7.9 MB + 2 good "
                            f"({big.stat().st_size / 2**20:.0f} MB)", step="run")
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    if a.json:
        print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                          "rows": rows}, indent=2))
        return
    print(f"{'file':<34} {'step':<8} {'tree PSS':>9} {'CLI RSS':>9} {'time':>7} {'printed':>8}")
    for r in rows:
        print(f"{r['file']:<34} {r['step']:<8} {r['peak_pss_tree_mb']:>6} MB "
              f"{r['peak_rss_cli_mb']:>6} MB {r['seconds']:>6}s "
              f"{r['lines_printed']:>8}" + (f"  exit {r['exit']}: {r['tail']}" if r["exit"]
                                           else ""))


if __name__ == "__main__":
    main()
