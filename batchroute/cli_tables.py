"""The tables the CLI prints: reports, rate-limit pools, rejected lines.

Kept apart from the commands (cli.py) so each command reads as its flow: parse the
options, call the library, print. Tables go to stdout (`out`, what a command reports);
notes and warnings to stderr (`console`), so `run -o - > file` stays clean.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from batchroute.terminal import escape, for_rich

console = Console(stderr=True)
out = Console()


def show_problems(problems: list[tuple[int, str]], total: int) -> None:
    console.print(f"[yellow]{total} line(s) rejected; the other lines go on:[/yellow]")
    for line_no, reason in problems[:20]:
        console.print(f"  line {line_no}: {escape(reason)}", markup=False, highlight=False)
    if total > 20:
        console.print(f"  ... and {total - 20} more (see `batchroute status BATCH --json`)")


def show_pools(pools: list[dict[str, Any]], problem: str | None) -> None:
    """Rate-limit pools (shared by all workers): use in the current window vs limits."""
    if problem:
        console.print(f"[yellow]{problem}[/yellow]", highlight=False)
    if not pools:
        return
    t = Table(title="rate-limit pools (all workers, last window)")
    for col in ("pool", "requests", "tokens", "in flight", "deferred", "blocked"):
        t.add_column(col, justify="left" if col == "pool" else "right")

    def use(used: int, limit: int | None, pct: float | None) -> str:
        return f"{used} / {limit} ({pct:.0f}%)" if limit else f"{used}"

    for p in pools:
        t.add_row(f"{p['pool']} ({p['window_s']:g} s)",
                  use(p["requests"], p["rpm"], p["requests_pct"]),
                  use(p["tokens"], p["tpm"], p["tokens_pct"]),
                  use(p["in_flight"], p["max_concurrency"], p["in_flight_pct"]),
                  str(p["deferred"]), f"{p['blocked_s']:.1f} s" if p["blocked_s"] else "-")
    out.print(t)


def show_report(r: dict[str, Any]) -> None:
    head = Table(title=f"batch {for_rich(r['batch_id'])} — {for_rich(r['name'])}",
                 show_header=False)
    head.add_column("", style="bold")
    head.add_column("", justify="right")
    rows = [("jobs", r["jobs"]), ("succeeded", r["succeeded"]), ("failed", r["failed"]),
            ("pending", r["pending"]), ("bad lines", r["bad_lines"]),
            ("attempts", r["attempts"]), ("cost", f"${r['cost_usd']:.4f}"),
            ("baseline (reference models)", f"${r['baseline_cost_usd']:.4f}"),
            ("savings", f"{r['savings_pct']:.1f}%"),
            ("escalation rate", f"{100 * r['escalation_rate']:.1f}%"),
            ("cost per success", f"${r['cost_per_success_usd']:.6f}"
             if r["cost_per_success_usd"] is not None else "-")]
    reuse = r.get("reuse") or {}
    if reuse.get("hits"):
        split = r.get("savings_by_source") or {}
        rows.append(("reused answers", f"{reuse['hits']} ({reuse['within_batch']} within the "
                                       f"batch, {reuse['across_batches']} from earlier ones)"))
        rows.append(("saved by routing / batch discount / reuse",
                     f"${split.get('routing_usd', 0):.4f} / "
                     f"${split.get('batch_discount_usd', 0):.4f} / "
                     f"${split.get('reuse_usd', 0):.4f}"))
    res = r.get("resilience") or {}
    if res.get("provider_errors") or res.get("failovers"):
        rows.append(("provider errors", ", ".join(f"{k} {v}" for k, v in
                                                  res["provider_errors"].items()) or "0"))
        rows.append(("retries / failovers", f"{res['retries']} / {res['failovers']}"))
    for k, v in rows:
        head.add_row(k, str(v))
    out.print(head)
    for key in ("by_tier", "by_model", "by_task"):
        t = Table(title=key.replace("_", " "))
        for col in ("", "jobs", "succeeded", "attempts", "tokens", "cost", "cost/accepted"):
            t.add_column(col, justify="left" if not col else "right")
        for name, b in r[key].items():
            t.add_row(for_rich(name), str(b["jobs"]), str(b["succeeded"]), str(b["attempts"]),
                      str(b["tokens"]), f"${b['cost_usd']:.4f}",
                      usd(b.get("cost_per_success_usd")))
        out.print(t)
    show_cascade(r.get("cascade"))


def usd(x: float | None, digits: int = 6) -> str:
    return "-" if x is None else f"${x:.{digits}f}"


def show_cascade(c: dict[str, Any] | None) -> None:
    """Per task and tier: this batch's pass rate and costs, then what the adaptive router
    decides now from its window of history, with the expected costs it compared."""
    if not c or not c.get("tasks"):
        return
    mine = Table(title="per task and tier (this batch)")
    for col in ("task", "tier", "answered", "pass rate", "$/attempt", "accepted", "$/accepted"):
        mine.add_column(col, justify="left" if col == "task" else "right")
    state = "on" if c["enabled"] else "off, shown: what it would do"
    router = Table(title=f"adaptive cascade ({state}; min {c['min_observations']} obs, "
                         f"explore {100 * c['explore_rate']:g}%, window {c['window']})")
    for col in ("task", "tier", "obs", "pass rate", "E(try)", "E(skip)", "decision"):
        router.add_column(col, justify="left" if col in ("task", "decision") else "right")
    for task, tc in c["tasks"].items():
        for tier, row in tc["tiers"].items():
            mine.add_row(task, tier, str(row["answered"]),
                         "-" if row["pass_rate"] is None else f"{100 * row['pass_rate']:.1f}%",
                         usd(row["mean_cost_usd"]), str(row["accepted"]),
                         usd(row["cost_per_accepted_usd"]))
            rt = row.get("router")
            if not rt:
                continue
            decision = ("skip" if rt["skipped"] else "top" if rt["expected_if_skipped_usd"]
                        is None else "cold" if rt["pass_rate"] is None else "try")
            router.add_row(task, tier, str(rt["observations"]),
                           "-" if rt["pass_rate"] is None else f"{100 * rt['pass_rate']:.1f}%",
                           usd(rt["expected_if_tried_usd"]),
                           usd(rt["expected_if_skipped_usd"]), decision)
    out.print(mine)
    out.print(router)


def show_provider_batches(pbs: dict[str, Any]) -> None:
    """`status`: the batch's open provider batches, one line each (none: nothing printed)."""
    if not pbs.get("open"):
        return
    table = Table(title=f"provider batches ({pbs['count']} in all)")
    for name in ("provider batch", "model", "state", "provider status", "jobs", "done"):
        table.add_column(name, justify="right" if name in ("jobs", "done") else "left")
    for pb in pbs["open"]:
        counts = pb.get("counts") or {}
        done = counts.get("completed", counts.get("succeeded", 0))
        table.add_row(for_rich(str(pb.get("remote_id") or pb["id"])), for_rich(pb["model"]),
                      pb["state"], for_rich(pb.get("remote_status") or "-"), str(pb["jobs"]),
                      str(done))
    out.print(table)
