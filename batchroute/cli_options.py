"""Options shared by `run` and `submit`: how long jobs may wait, answer reuse, provider
batches. One definition each, so the two commands cannot drift apart."""

from __future__ import annotations

from typing import Any

import click


def deadline_option(f: Any) -> Any:
    """--deadline, the same on `run` and `submit`."""
    return click.option(
        "--deadline", "deadline", default="24h", show_default=True,
        callback=lambda _c, _p, v: _duration(v),
        help="How long jobs may wait out provider outages (e.g. 24h, 90m) before "
             "failing; transient errors never fail a job before it.")(f)


def reuse_option(f: Any) -> Any:
    """--reuse / --no-reuse (batchroute.reuse), the same on `run` and `submit`."""
    return click.option(
        "--reuse/--no-reuse", "reuse", default=None,
        help="Answer reuse: identical requests (same model, normalised messages, parameters, "
             "checks and config models) are answered once, within the batch and from earlier "
             "batches in the store, at $0. Default: only deterministic requests "
             "(temperature 0; an absent temperature is 1, not deterministic). --reuse: "
             "every request, temperature or not; --no-reuse: none. Applies to the jobs this "
             "command stores (a file stored before keeps its jobs' setting).")(f)


def provider_batch_option(f: Any) -> Any:
    """--provider-batch / --no-provider-batch, the same on `run` and `submit`."""
    return click.option(
        "--provider-batch/--no-provider-batch", "provider_batch", default=None,
        help="Provider batch APIs (OpenAI Batch, Anthropic Message Batches: about half "
             "price, answers within hours): pools marked `batch = true` in the routing "
             "config use them by default; --no-provider-batch sends this batch's calls "
             "synchronously. At --deadline, provider batches still running are cancelled "
             "and what is left runs synchronously.")(f)


def reuse_mode(reuse: bool | None) -> str | None:
    return None if reuse is None else "on" if reuse else "off"


def _duration(value: str) -> float:
    from batchroute.waiting import parse_duration

    try:
        return parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
