"""`batchroute estimate FILE`: what a batch will cost, before a cent is spent.

Prompt tokens are counted with tiktoken (what routing uses); answer tokens are
what this task's answers used in the store's history, or, with no history, a
share of max_tokens. The routed cost is given as a range (every job passes where
it starts … every job climbs the whole ladder) and an expected value from the
pass rates seen per (task, tier), or a prior when the store has too few.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchroute.cascade import expected_cost
from batchroute.completion import Usage
from batchroute.config import Config
from batchroute.ingest import _lines
from batchroute.jobspec import LineProblem, parse_line
from batchroute.pricing import model_cost, reference_cost
from batchroute.router import RouteError, pick_model, route
from batchroute.store import Store
from batchroute.tokens import count_messages, max_completion

MIN_HISTORY = 20
HISTORY_WINDOW = 5000


@dataclass(frozen=True)
class Assumptions:
    completion_ratio: float = 0.25  # answer tokens / max_tokens, without history
    prior_pass_rate: float = 0.8  # per non-top tier, without history


def _history(store: Store) -> dict[tuple[str, int], dict[str, float]]:
    """Per (task, tier): answered attempts, passes and mean answer tokens, recent first."""
    return {(task, tier): {"attempts": n, "passes": ok, "completion_mean": completion / n}
            for task, tier, n, ok, _cost, _prompt, completion in store.tier_stats(HISTORY_WINDOW)
            if n}


def estimate_file(config: Config, path: Path, store: Store | None = None,
                  assume: Assumptions | None = None) -> dict[str, Any]:
    assume = assume or Assumptions()
    history = _history(store) if store is not None else {}
    seen: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # task -> [tokens, n]
    for (task, _tier), h in history.items():
        seen[task][0] += h["completion_mean"] * h["attempts"]
        seen[task][1] += h["attempts"]
    completion_seen = {task: tok / n for task, (tok, n) in seen.items() if n >= MIN_HISTORY}
    out: dict[str, Any] = {"file": str(path), "lines": 0, "jobs": 0, "bad_lines": 0,
                           "problems": [], "prompt_tokens": 0, "completion_tokens_expected": 0,
                           "completion_tokens_max": 0}
    per_tier: dict[int, float] = defaultdict(float)
    by_task: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    low = high = expected = baseline = 0.0
    pass_source: set[str] = set()
    for line_no, raw in _lines(path):
        out["lines"] += 1
        try:
            if isinstance(raw, LineProblem):
                raise raw
            spec = parse_line(raw, line_no, config)
            prompt = count_messages(spec.body["messages"])
            r = route(config, spec, prompt)
        except (LineProblem, RouteError) as e:
            out["bad_lines"] += 1
            if len(out["problems"]) < 100:
                out["problems"].append({"line": line_no, "reason": str(e)})
            continue
        cap = max_completion(spec.body)
        answer = min(cap, round(completion_seen.get(spec.task, assume.completion_ratio * cap)))
        usage = Usage(prompt, answer)
        out["jobs"] += 1
        out["prompt_tokens"] += prompt
        out["completion_tokens_expected"] += answer
        out["completion_tokens_max"] += cap
        for tier in config.tiers:
            m = pick_model(config, tier, spec.pin)
            if m is not None:
                per_tier[tier] += model_cost(m, usage)
        ladder = r.ladder[r.start_index:]
        costs = [model_cost(pick_model(config, t, spec.pin), usage)  # type: ignore[arg-type]
                 for t in ladder]
        passes = []
        for t in ladder:
            seen_here = history.get((spec.task, t))
            if seen_here is not None and seen_here["attempts"] >= MIN_HISTORY:
                passes.append(seen_here["passes"] / seen_here["attempts"])
                pass_source.add("history")
            else:
                passes.append(1.0 if t == ladder[-1] else assume.prior_pass_rate)
                pass_source.add("prior")
        job_expected = expected_cost(passes, costs)
        low, high, expected = low + costs[0], high + sum(costs), expected + job_expected
        ref = reference_cost(config, r.reference_model, usage) if r.reference_model else None
        baseline += ref or 0.0
        row = by_task[spec.task]
        row["jobs"] += 1
        row["expected_cost_usd"] += job_expected
        row["baseline_cost_usd"] += ref or 0.0
    out["per_tier"] = {str(t): {"model": (pick_model(config, t) or config.models_at(t)[0]).name,
                                "cost_usd": round(c, 6)} for t, c in sorted(per_tier.items())}
    out["routed_cost_usd"] = {"low": round(low, 6), "expected": round(expected, 6),
                              "high": round(high, 6)}
    out["baseline_cost_usd"] = round(baseline, 6)
    out["expected_savings_pct"] = (round(100 * (baseline - expected) / baseline, 1)
                                   if baseline else 0.0)
    out["by_task"] = {k: {kk: round(vv, 6) for kk, vv in v.items()}
                      for k, v in sorted(by_task.items())}
    out["assumptions"] = {
        "answer_tokens": "history" if completion_seen else
        f"{assume.completion_ratio:.0%} of max_tokens (no history in the store)",
        "pass_rates": " + ".join(sorted(pass_source)) or "none",
        "prior_pass_rate": assume.prior_pass_rate,
    }
    return out
