"""What a finished (or watched) batch should warn about, and the exit code it earns.

A run where 12 of 20 jobs failed, costing 8.6x its baseline, used to print the report
and exit 0: nothing told the user (or their script) that something was wrong. These
pure functions turn a report (or status counts) into warning lines and an exit code;
the commands print them on stderr and exit with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from batchroute.config import Config

#: Exit code of `run`/`results`/`status --fail-on-failed` when jobs failed (1 is an error
#: of the command itself, 2 a usage error).
FAILED_EXIT = 3


def failed_warning(failed: int, jobs: int, batch_id: str, errors_file: str | None) -> str | None:
    """One line when jobs failed, saying where their reasons are."""
    if not failed:
        return None
    where = f"their errors are in {errors_file}" if errors_file else (
        f"`batchroute results {batch_id} -o out.jsonl --errors errors.jsonl` writes their "
        "errors")
    return f"warning: {failed} of {jobs} job(s) failed; {where}"


def savings_warning(report: Mapping[str, Any]) -> str | None:
    """A clear line when routing cost more than running every job on its reference model."""
    cost, baseline = report.get("cost_usd") or 0.0, report.get("baseline_cost_usd") or 0.0
    if not baseline or cost <= baseline:
        return None
    return (f"warning: routing cost ${cost:.4f}, more than the baseline ${baseline:.4f} "
            f"({cost / baseline:.1f}x, savings {report.get('savings_pct', 0.0):.1f}%): jobs "
            "failed their checks on cheap tiers and were paid for again higher up; see the "
            "'per task and tier' table (`batchroute report BATCH`) and the job validators")


def report_warnings(report: Mapping[str, Any], errors_file: str | None = None) -> list[str]:
    lines = [failed_warning(int(report.get("failed") or 0), int(report.get("jobs") or 0),
                            str(report.get("batch_id", "BATCH")), errors_file),
             savings_warning(report)]
    return [line for line in lines if line]


def simulated_note(config: Config) -> str | None:
    """Said in `run`'s output when every provider is the built-in simulator, so nobody
    mistakes its answers for a model's."""
    providers = list(config.providers.values())
    if not providers or not all(p.base_url.startswith("sim:") for p in providers):
        return None
    replay = (config.simulator or {}).get("replay")
    if replay:
        return (f"note: answers are replayed from {replay} (the simulator in replay mode), "
                "not asked of a model now")
    return ("note: answers are simulated (the built-in simulator, base_url sim://); "
            "for real answers pass --config with real providers "
            "(see jobs/providers.example.toml)")


def exit_code(failed: int, fail_on_failed: bool) -> int:
    return FAILED_EXIT if fail_on_failed and failed else 0
