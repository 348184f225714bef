"""Peak RSS of `batchroute run` when a provider answers a 200 MB body (issue #15).

    python benchmarks/hostile_rss.py                       # this checkout
    python benchmarks/hostile_rss.py --code /path/to/other  # another checkout ("before")

Starts tests/hostile_server.py in a subprocess, then runs a one-job batch pinned to a
provider whose reply is a well-formed chat.completion with a 200 MB answer
("big-valid"), in a child process whose PYTHONPATH is the checkout measured. Prints the
child's peak RSS, how the job ended, the stored result's size and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys
from pathlib import Path
from batchroute.config import parse_config
from batchroute.embedded import run_file
from batchroute.store import Store, get_engine
url, tmp, behaviour = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
config = parse_config({
    "providers": {"h": {"base_url": f"{url}/{behaviour}/v1", "timeout_s": 60,
                        "max_retries": 0}},
    "models": {"m": {"provider": "h", "tier": 1,
                     "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}},
    "tasks": {"default": {"ladder": [1], "validators": []}},
})
src = tmp / "in.jsonl"
src.write_text(json.dumps({"custom_id": "big", "body": {"model": "auto", "messages": [
    {"role": "user", "content": "Say hello."}]}}) + "\n")
store = Store(get_engine(f"sqlite:///{tmp / 'rss.db'}"))
outcome = run_file(src, tmp / "out.jsonl", tmp / "err.jsonl", config, store=store)
a = store.attempts(outcome.ingest.batch_id)[0]
print(json.dumps({"succeeded": outcome.report["succeeded"], "outcome": a.outcome,
                  "error_kind": a.error_kind,
                  "out_bytes": (tmp / "out.jsonl").stat().st_size,
                  "db_bytes": sum(p.stat().st_size for p in tmp.glob("rss.db*"))}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--code", default=str(ROOT), help="checkout whose batchroute is measured")
    ap.add_argument("--behaviour", default="big-valid")
    args = ap.parse_args()
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hostile_server.py")],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "PYTHONPATH": args.code, "BATCHROUTE_LOG_LEVEL": "WARNING"}
            started = time.monotonic()
            child = subprocess.run([sys.executable, "-c", CHILD, url, tmp, args.behaviour],
                                   capture_output=True, text=True, env=env, check=False,
                                   cwd=tmp)
            wall = time.monotonic() - started
            peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            lines = [x for x in child.stdout.splitlines() if x.startswith("{")]
            result = json.loads(lines[-1]) if lines else {"stderr": child.stderr[-500:]}
        print(json.dumps({"code": args.code, "behaviour": args.behaviour,
                          "peak_rss_mb": round(peak_mb), "wall_s": round(wall, 1),
                          **result}, indent=1))
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
