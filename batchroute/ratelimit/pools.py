"""A pool's limits (`Scope`) and the interface every backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from batchroute.ratelimit.schedule import (
    DEFAULT_SAFETY_S,
    MAX_DEFER_S,
    SLEEP_HORIZON_S,
    TOKEN_BURST_FRACTION,
    Pace,
    Rate,
    token_burst,
)


@dataclass(frozen=True)
class Scope:
    """One set of limits: a provider pool, or one model within it."""

    name: str  # "openai" or "openai/gpt-4o"
    key: str  # Redis key base
    window_s: float
    rpm: Rate | None = None
    tpm: Rate | None = None
    max_concurrency: int | None = None
    # A settled call counts at min(reply, admission + this); None: at its reply (strict).
    arrival_cap_s: float | None = None

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_concurrency)


def build_scope(name: str, key: str, window_s: float, rpm: int | None, tpm: int | None,
                max_concurrency: int | None, safety_s: float | None = DEFAULT_SAFETY_S,
                token_burst_fraction: float = TOKEN_BURST_FRACTION) -> Scope:
    """``safety_s``: the scope's ``arrival_cap_s`` (``schedule``'s module docstring)."""
    if safety_s is not None and safety_s < 0:
        raise ValueError(f"safety_s must be >= 0, got {safety_s}")
    return Scope(
        name=name, key=key, window_s=window_s,
        rpm=Rate(rpm, window_s, 1) if rpm else None,
        tpm=Rate(tpm, window_s, token_burst(tpm, token_burst_fraction)) if tpm else None,
        max_concurrency=max_concurrency or None, arrival_cap_s=safety_s)


@dataclass(frozen=True)
class Request:
    """One acquisition, as a backend sees it."""

    cost: int  # tokens reserved
    holder: str  # concurrency holder id
    lease_s: float
    horizon_s: float = SLEEP_HORIZON_S
    max_defer_s: float = MAX_DEFER_S
    defer_only: bool = False  # the worker has waited long enough: queue it
    # The job and attempt ("id:attempt"): a job that already got a turn in the shadow
    # schedule and came back before the window had room rejoins at the window's start
    # instead of queueing behind every job deferred since (which stretched the tail).
    job_key: str = ""
    # The latest a call may still be running after its start (its deadline plus a grace);
    # 0: lease_s. Its window entries count at start + this until it settles.
    bound_s: float = 0.0

    @property
    def in_flight_s(self) -> float:
        return self.bound_s or self.lease_s


@dataclass(frozen=True)
class Outcome:
    """A backend's answer. ``wait_s``: for GRANTED the sleep before calling, for RETRY the
    sleep before asking again, for DEFER the time until the job's turn in the shadow
    schedule (``capped``: beyond ``max_defer_s``, not given a turn)."""

    kind: str
    wait_s: float
    reason: str = ""  # rpm | tpm | concurrency | blocked
    now: float = 0.0  # the backend's clock when it decided
    capped: bool = False


class Backend(Protocol):
    def acquire(self, scopes: Sequence[Scope], req: Request) -> Outcome: ...

    def settle(self, scopes: Sequence[Scope], holder: str, delta: int, started_at: float,
               block: Sequence[bool], block_s: float, lead_s: float = 0.0) -> None: ...

    def usage(self, scope: Scope) -> dict[str, Any]: ...


def limits_of(scope: Scope, cost: int) -> list[tuple[str, Rate, int]]:
    out: list[tuple[str, Rate, int]] = []
    if scope.rpm:
        out.append(("r", scope.rpm, 1))
    if scope.tpm:
        out.append(("t", scope.tpm, cost))
    return out



def span(rate: Rate) -> float:
    """The window a pool counts its logged arrival bounds over: the provider's."""
    return rate.window_s + rate.safety_s


def pace(rate: Rate) -> Pace:
    return Pace(rate.limit, span(rate))


def usage_dict(scope: Scope, requests: int, tokens: int, deferred: int, in_flight: int,
               blocked_s: float) -> dict[str, Any]:
    return {
        "pool": scope.name, "window_s": scope.window_s,
        "requests": requests, "rpm": scope.rpm.limit if scope.rpm else None,
        "tokens": tokens, "tpm": scope.tpm.limit if scope.tpm else None,
        "in_flight": in_flight, "max_concurrency": scope.max_concurrency,
        "deferred": deferred, "blocked_s": round(blocked_s, 3),
    }
