"""The pure arithmetic of the pools: the provider's sliding window, and the pacing of jobs
that wait for it. No I/O, no clock: every function takes `now`.

**Admission: the provider's own window.** A provider (and our simulator) refuses a
request when the last ``W`` seconds already hold ``L`` units, counted when the request
*arrives*. We never see that instant, but we know bounds of it: a request arrives after
our admission ``a`` and before its reply (or error) comes back at ``c``. So a pool logs
each request at the *latest time it may have arrived*: ``a + B`` while it is in flight
(``B``: the call's deadline plus a grace, :func:`in_flight_until`: a lost settle costs
that long), then, when it settles, ``min(c, a + cap)`` (:func:`settled_at`; ``cap`` is
``DEFAULT_SAFETY_S``, 2 s, unless a provider sets its own or none). It admits a request
when the entries logged in the last ``W`` seconds, plus the request, stay within ``L``:
so a fresh pool spends the window's whole allowance at once, and then keeps pace as the
window frees up, at about ``L / (W + min(latency, cap))``.

Strict, whatever the delays (without a cap): take any provider window ``(x - W, x]``
and, among the requests that arrived in it, the one admitted last, at ``a* <= x``. When
it was admitted every other one was already admitted; each was either in flight (logged
at ``a + B``, later than anything leaving) or settled at ``c >= arrival > x - W >= a* - W``:
still in our window. Our check kept all of them plus it within ``L``. A ``cap`` gives
that up for calls slower than ``cap`` (they count at ``a + cap``, the old fixed margin),
for providers whose calls are long against their window (``W + latency`` paces slower).

Waits are computed twice: :func:`window_start` over the logged times gives a start that
is safe to sleep until; with ``clamp = now`` (an in-flight call assumed to settle at
once) it gives the earliest start that could become safe, to put a job back for.

**Waiting: a shadow schedule.** Jobs that must wait longer than a worker sleeps are put
back on the queue with a countdown. The countdown is the job's turn in a shadow schedule
that only waiting jobs advance: a bucket of a whole window's allowance refilled at
``L / W``, starting when the real window could free up. So a crowd of waiting jobs comes
back spread over their turns, a window's worth at a time, instead of all at once.

(``Rate``, ``earliest`` and ``commit`` are the GCRA both use for the shadow schedule.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

KEY_PREFIX = "batchroute:rl:"
DEFAULT_SAFETY_S: float | None = 2.0
"""Default cap of the admission-to-arrival delay a call counts with. Calls that reply
within it count until their reply (strict); slower ones count at admission + 2 s, so
long LLM calls pace at ``L / (W + 2 s)`` (3% under the allowance on a 60 s window)
instead of ``L / (W + latency)`` (25% under it for 20 s replies); what that gives up is
strictness for a request that reaches the provider more than 2 s after its admission.
None: no cap (a provider sets its own with ``rate_safety_s``)."""
SLEEP_HORIZON_S = 1.0
"""Longest wait a worker sleeps through; longer waits put the job back on the queue."""
MAX_DEFER_S = 300.0
"""Longest countdown of a re-published job: well under the 3600 s visibility timeout."""
TOKEN_BURST_FRACTION = 1 / 60
"""Token bucket size as a share of tpm (see the module docstring)."""
LEASE_GRACE_S = 30.0
"""A concurrency slot's lease is the provider timeout plus this."""
DEFAULT_BLOCK_S = 1.0
"""How long a 429 without a retry-after blocks its pool."""
MAX_BLOCK_S = 60.0
MIN_POLL_S, MAX_POLL_S = 0.02, 0.25
"""Bounds of the in-worker wait between concurrency checks."""

GRANTED, RETRY, DEFER = "granted", "retry", "defer"
TURN_KEPT_S = 60.0
"""How long after its turn a deferred job that comes back too early rejoins at once."""


EDGE_S = 1e-6


class Schedule(Protocol):
    @property
    def interval(self) -> float: ...

    @property
    def tolerance(self) -> float: ...



@dataclass(frozen=True)
class Rate:
    """``limit`` units per ``window_s`` as GCRA parameters, strict under a sliding window
    whose requests arrive up to ``safety_s`` late (the pools log arrival bounds instead,
    and build theirs with ``safety_s = 0``)."""

    limit: int
    window_s: float = 60.0
    burst: int = 1
    safety_s: float = 0.0

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if not 1 <= self.burst <= self.limit:
            raise ValueError(f"burst must be within 1..{self.limit}, got {self.burst}")
        if self.window_s <= 0 or self.safety_s < 0:
            raise ValueError("window_s must be > 0 and safety_s >= 0")

    @property
    def interval(self) -> float:
        """Seconds of schedule one unit occupies."""
        return (self.window_s + self.safety_s) / (self.limit + 1 - self.burst)

    @property
    def tolerance(self) -> float:
        """How far ahead of now the schedule may run: a full bucket of ``burst`` units."""
        return self.burst * self.interval


def earliest(tat: float, now: float, cost: float, rate: Schedule) -> float:
    """When a request of ``cost`` units may start, given the theoretical arrival time
    ``tat`` of the schedule. A request bigger than the bucket starts on a full bucket."""
    tol = max(rate.tolerance, cost * rate.interval)
    return max(now, tat + cost * rate.interval - tol)


def commit(tat: float, start: float, cost: float, rate: Schedule) -> float:
    """The schedule after admitting ``cost`` units at ``start``."""
    return max(tat, start) + cost * rate.interval


def adjust(tat: float, delta: float, rate: Schedule) -> float:
    """The schedule after a reservation turned out ``delta`` units too small (or large)."""
    return tat + delta * rate.interval


def available(tat: float, now: float, rate: Schedule) -> float:
    """Units that could start right now (the bucket's level)."""
    return max(0.0, (rate.tolerance - max(0.0, tat - now)) / rate.interval)


def token_burst(tpm: int, fraction: float = TOKEN_BURST_FRACTION) -> int:
    return max(1, min(tpm, math.ceil(tpm * fraction)))



@dataclass(frozen=True)
class Pace:
    """The shadow schedule of a limit: a bucket of ``limit`` units (a whole window's
    allowance) refilled at ``limit / span``."""

    limit: int
    span: float

    @property
    def interval(self) -> float:
        return self.span / self.limit

    @property
    def tolerance(self) -> float:
        return self.span


def window_start(entries: Iterable[tuple[float, float]], total: float, t0: float, cost: float,
                 limit: int, span: float, clamp: float = math.inf) -> float:
    """The earliest time ``>= t0`` at which ``cost`` more units keep the sliding window
    of ``span`` seconds within ``limit``, if nothing else is admitted meanwhile.

    ``entries`` are the logged ``(time, units)``, times ascending, ``total`` their sum.
    The entries are walked oldest first until enough units would have left; the answer
    is when the latest of those leaves. A request bigger than ``limit`` waits for an
    empty window. ``clamp`` takes each time as at most ``clamp``: with ``now``, calls in
    flight count as if they settled now (an estimate, not a safe start).
    """
    need = total + cost - limit
    if need <= 0:
        return t0
    freed, latest = 0.0, -math.inf
    for at, units in entries:
        freed += units
        latest = max(latest, min(at, clamp))
        if freed >= need:
            break
    # 1 us past the edge: the provider drops an entry exactly `span` old, and clocks and
    # Redis keep microseconds, so at the edge float rounding could land on either side.
    return max(t0, latest + span + EDGE_S)


def in_flight_until(start: float, cap: float | None, bound_s: float) -> float:
    """What a call admitted at ``start`` is logged at until it settles: the latest it may
    reach the provider. ``bound_s``: the call's deadline plus a grace (a worker that died
    mid-call never settles; its entry then leaves ``bound_s + W`` after ``start``)."""
    return start + (bound_s if cap is None else min(cap, bound_s))


def settle_lead(lead_s: float, now: float, started_at: float) -> float:
    """How much earlier than ``now`` a settled call may be dated: the time the provider
    says it held the request after counting it, never more than the call has been
    admitted (``started_at``, the backend's clock; 0 when unknown) and never negative."""
    if not math.isfinite(lead_s) or lead_s <= 0:
        return 0.0
    if started_at > 0:
        lead_s = min(lead_s, max(0.0, now - started_at))
    return lead_s


def settled_at(logged: float, now: float) -> float:
    """A settled call's entry: it reached the provider before its reply came back."""
    return min(logged, now)
