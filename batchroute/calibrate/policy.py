"""Writing a calibration as the routing config a user runs with, and its header."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from batchroute import scorer as scoring
from batchroute.calibrate.replaying import _canonical
from batchroute.calibrate.types import SCORER, Calibration, CalibrationError, Policy, Rung
from batchroute.config import Config, ModelConfig

# ---------------------------------------------------------------- the routing config


def policy_config(cal: Calibration, config: Config, raw: dict[str, Any] | None = None,
                  scorer_dir: Path | None = None, base: Path | None = None,
                  ) -> dict[str, Any]:
    """The routing config (as a TOML-ready dict) that runs the calibrated policies.

    Everything but providers, models and tasks is copied from ``raw`` (the input
    config's TOML), so settings such as [simulator] or breakers carry over; the adaptive
    cascade is switched off (see below). Only the kept models are written, renumbered
    cheapest first as tiers 1, 2, ...; each task's ladder lists its rungs' tiers and each
    check carries ``tiers`` = the rungs it decides at.

    Learned scorers are written as JSON files into ``scorer_dir`` (one per task and
    model) and referenced as ``model_file``, relative to ``base`` (the directory of the
    config being written; ``load_config`` reads it relative to the config file);
    without ``scorer_dir`` they stay inline in the spec.
    """
    raw = dict(raw or {})
    kept = [m for m in cal.model_order
            if any(r.model == m for c in cal.tasks.values() for r in c.policy.rungs)]
    tier = {m: i + 1 for i, m in enumerate(kept)}
    out: dict[str, Any] = {k: v for k, v in raw.items()
                           if k not in ("providers", "models", "tasks")}
    raw_models = raw.get("models") or {}
    raw_providers = raw.get("providers") or {}
    providers: dict[str, Any] = {}
    models: dict[str, Any] = {}
    for m in kept:
        mc = config.models[m]
        table = dict(raw_models.get(m) or _model_table(mc))
        table["tier"] = tier[m]
        models[m] = table
        pc = config.providers[mc.provider]
        providers[pc.name] = dict(raw_providers.get(pc.name) or _provider_table(pc))
    tasks: dict[str, Any] = {}
    for name, c in cal.tasks.items():
        checks: dict[str, tuple[dict[str, Any], list[int]]] = {}
        for rung in c.policy.rungs[:-1]:
            for spec in rung.checks:
                if spec.get("type") == SCORER and scorer_dir is not None:
                    spec = _write_scorer(spec, name, rung.model, scorer_dir, base)
                key = _canonical(spec)
                checks.setdefault(key, (dict(spec), []))[1].append(tier[rung.model])
        tasks[name] = {"ladder": [tier[r.model] for r in c.policy.rungs],
                       "validators": [{**spec, "tiers": sorted(tiers)}
                                      for spec, tiers in checks.values()]}
    if "default" not in tasks:
        only = next(iter(tasks.values())) if len(tasks) == 1 else None
        tasks["default"] = dict(only) if only else {"ladder": sorted(tier.values()),
                                                    "validators": []}
    out["providers"] = providers
    out["models"] = models
    out["tasks"] = tasks
    # The calibrated ladder already is the tier-skipping decision, made with labelled
    # answers; the run-time adaptive cascade (validator pass rates, no labels) must not
    # re-decide it.
    out["cascade"] = {**dict(raw.get("cascade") or {}), "enabled": False}
    return out


def scorer_dir_for(output: Path) -> Path:
    """Where the scorers of a policy written to ``output`` go: ``policy.toml`` ->
    ``policy.scorers/`` beside it, so the two move together."""
    return output.parent / f"{output.stem}.scorers"


def _write_scorer(spec: Mapping[str, Any], task: str, model: str, scorer_dir: Path,
                  base: Path | None) -> dict[str, Any]:
    """Move an inline scorer into its own JSON file; the spec then names the file."""
    scorer_dir.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{task}.{model}")
    path = scorer_dir / f"{safe}.json"
    scoring.Scorer.from_dict(spec["model"]).save(path)
    ref = str(path)
    if base is not None:
        try:
            ref = str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            ref = str(path.resolve())
    return {k: v for k, v in spec.items() if k != "model"} | {"model_file": ref}


def _model_table(m: ModelConfig) -> dict[str, Any]:
    table: dict[str, Any] = {"provider": m.provider, "model": m.api_model, "tier": m.tier}
    if m.price is not None:
        price: dict[str, Any] = {"input_per_mtok": m.price.input_per_mtok,
                                 "output_per_mtok": m.price.output_per_mtok}
        if m.price.cached_input_per_mtok is not None:
            price["cached_input_per_mtok"] = m.price.cached_input_per_mtok
        table["price"] = price
    for key in ("price_ref", "price_provider"):
        if getattr(m, key) is not None:
            table[key] = getattr(m, key)
    table["context_window"] = m.context_window
    return table


def _provider_table(p: Any) -> dict[str, Any]:
    table = {"kind": p.kind, "base_url": p.base_url, "timeout_s": p.timeout_s,
             "max_retries": p.max_retries}
    if p.api_key_env:
        table["api_key_env"] = p.api_key_env
    for key in ("rpm", "tpm", "max_concurrency"):
        if getattr(p, key, None) is not None:
            table[key] = getattr(p, key)
    return table


def header(cal: Calibration) -> str:
    """A comment block saying where the policy came from and what to expect of it.

    Only out-of-fold figures (cross-validation on the training file, paired with the
    reference on the same held-out records): in-sample accuracy flatters every policy
    that was chosen on it, so it is not printed.
    """
    lines = [f"Written by `batchroute calibrate` from {cal.source or 'a training file'} "
             f"({cal.queries} labelled queries).",
             f"Target: {cal.target.describe()}."]
    for name, c in cal.tasks.items():
        ref = c.reference or c.best_single
        lines.append(f"task {name}: {c.policy.describe()}")
        lines.append(f"  reference model: {ref} (top rung; savings are against it)")
        if c.cv is None:
            lines.append("  no out-of-fold estimate (cross-validation off or too few "
                         "records): evaluate on held-out queries before trusting it")
            continue
        kept, base = c.cv.kept, c.cv.baseline
        saving = 1 - kept.cost_usd / base.cost_usd if base.cost_usd else 0.0
        diff, low = c.cv.paired.get(c.cv.chosen.label(), (0.0, 0.0))
        what = ("difference" if cal.target.kind == "best"
                else "above the target's floor by" if cal.target.kind != "cost"
                else "accuracy difference")
        lines.append(f"  out of fold ({c.cv.repeats}x{c.cv.folds} folds of the training "
                     f"data, kept {c.cv.chosen.label()}): accuracy {kept.accuracy:.4f} vs "
                     f"{base.accuracy:.4f} for {ref} alone; {what} {100 * diff:+.2f} "
                     f"points (lower {c.cv.confidence:.0%} bound {100 * low:+.2f}); "
                     f"saving {saving:.1%} of its cost"
                     f"{'' if c.met else '  (target not met on the training data)'}")
    return "".join(f"# {line}\n" for line in lines)


def policy_from_config(config: Config, task: str) -> Policy:
    """The policy a routing config runs for ``task``: its ladder's preferred model per
    tier (the one the router picks first), each with the checks that apply at its tier
    (the top rung's answer is always kept, as in :func:`evaluate`). What lets
    ``benchmarks/replay.py --policy`` score a policy file, calibrated or hand-written."""
    from batchroute.router import pick_model
    from batchroute.validators.build import specs_for_tier

    profile = config.task(task)
    rungs = []
    for i, tier in enumerate(profile.ladder):
        model = pick_model(config, tier)
        if model is None:
            raise CalibrationError(f"task {task!r}: no model at tier {tier}")
        last = i == len(profile.ladder) - 1
        checks = () if last else tuple(specs_for_tier(list(profile.validators), tier))
        rungs.append(Rung(model.name, checks))
    return Policy(task, tuple(rungs))


def agreement_rule(task: str, cheap: Sequence[str], reference: str, votes: int = 2,
                   spec: Mapping[str, Any] | None = None) -> Policy:
    """The untrained rule "keep the answer when ``votes`` cheap models agree, else the
    reference": each cheap model in turn, with an ``agree`` check (the first ones only
    collect answers), then the reference."""
    check = {"type": "agree", "min_agree": votes, **dict(spec or {})}
    return Policy(task, (*(Rung(m, (check,)) for m in cheap), Rung(reference)))
