"""The adaptive cascade, as pure math: which tiers of a ladder are worth trying for a task.

A job climbs its ladder until an answer passes validation. Trying tier i costs its
mean cost per attempt c_i whatever happens, and with probability (1 - p_i) the job
still has to go on, so the expected cost of the ladder from tier i on is

    V_i = c_i + (1 - p_i) * V_next          (V after the last tier = 0)

Skipping tier i instead costs V_next. A tier is worth its place when
c_i + (1 - p_i) * V_next <= V_next, i.e. when c_i <= p_i * V_next: its cost must be
covered by the share of the rest of the ladder it saves. `plan` runs this backwards
from the top of the ladder, each V_next being the best plan of the tiers above, so the
kept set is the cheapest in expectation (for the measured p and c). The top tier is
never skipped: nothing above it can answer instead, so skipping it would trade accepted
outputs for money, and the cascade only trades where the number of accepted outputs
stays the same (higher tiers are assumed at least as good as lower ones).

Where the numbers come from (`batchroute.adaptive`): p_i and c_i per (task, tier) from the
Attempt ledger, over answered attempts (outcome ok or invalid; provider errors are retried
on the same tier and say nothing about answer quality). Two deliberate biases keep the
cascade from skipping on weak evidence:

- Cold start: a tier with fewer than `min_observations` answered attempts is never
  skipped, and in the V of the tiers below it counts as passing every answer (p = 1),
  which makes V_next as small as it can be and so makes skipping a lower tier less likely.
  Its cost is then an estimate (the task's mean tokens at the tier's price).
- p of a higher tier is measured mostly on jobs that failed the tiers below it (the
  harder ones), so it is, if anything, low; a low p_next raises V_next, which again
  favours keeping the lower tier.

Skipped tiers still get a small, deterministic share of jobs (`explores`: a hash of the
job id and the tier, not a random draw), so their estimate keeps being refreshed and can
recover, and the same job routes the same way in every run given the same statistics.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class CascadeConfigError(ValueError):
    """The [cascade] table is unusable; the message names the key."""


@dataclass(frozen=True)
class CascadeConfig:
    """``[cascade]`` in the routing config."""

    enabled: bool = True
    min_observations: int = 20
    """Answered attempts of a (task, tier) in the window before that tier may be skipped."""
    explore_rate: float = 0.05
    """Share of jobs that still try a skipped tier, so its estimate can recover."""
    window: int = 5000
    """How many of the most recent answered attempts (all tasks) the statistics cover."""
    ttl_s: float = 10.0
    """How long a process reuses the statistics before querying the store again."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> CascadeConfig:
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise CascadeConfigError(f"cascade: unknown key(s) {', '.join(map(repr, unknown))} "
                                     f"(known: {', '.join(cls.__dataclass_fields__)})")
        enabled = d.get("enabled", cls.enabled)
        if not isinstance(enabled, bool):
            raise CascadeConfigError(f"cascade.enabled: expected true or false, got {enabled!r}")
        ints = {}
        for key, low in (("min_observations", 1), ("window", 1)):
            value = d.get(key, getattr(cls, key))
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise CascadeConfigError(f"cascade.{key}: expected an integer >= {low}, "
                                         f"got {value!r}")
            ints[key] = value
        explore = d.get("explore_rate", cls.explore_rate)
        if isinstance(explore, bool) or not isinstance(explore, int | float) \
                or not 0.0 <= explore <= 1.0:
            raise CascadeConfigError(f"cascade.explore_rate: expected a number between 0 and "
                                     f"1, got {explore!r}")
        ttl = d.get("ttl_s", cls.ttl_s)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0:
            raise CascadeConfigError(f"cascade.ttl_s: expected a number >= 0, got {ttl!r}")
        return cls(enabled=enabled, explore_rate=float(explore), ttl_s=float(ttl), **ints)


@dataclass(frozen=True)
class TierStats:
    """What the ledger says about one (task, tier): answered attempts, passes, their cost."""

    attempts: int
    passes: int
    cost_usd: float

    @property
    def pass_rate(self) -> float:
        return self.passes / self.attempts if self.attempts else 0.0

    @property
    def mean_cost_usd(self) -> float:
        return self.cost_usd / self.attempts if self.attempts else 0.0


@dataclass(frozen=True)
class TierPlan:
    """One tier's place in a plan, with the numbers behind it (shown in reports)."""

    tier: int
    observations: int
    pass_rate: float | None  # None: too few observations, counted as 1 in the math
    mean_cost_usd: float | None  # None: neither observed nor estimable
    estimated: bool  # the cost is a token-based estimate, not observed
    expected_if_tried_usd: float | None  # V of the ladder from here if this tier is tried
    expected_if_skipped_usd: float | None  # V of the kept tiers above (None for the top)
    skip: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 10)

        return {"tier": self.tier, "observations": self.observations,
                "pass_rate": None if self.pass_rate is None else round(self.pass_rate, 4),
                "mean_cost_usd": r(self.mean_cost_usd), "cost_estimated": self.estimated,
                "expected_if_tried_usd": r(self.expected_if_tried_usd),
                "expected_if_skipped_usd": r(self.expected_if_skipped_usd),
                "skipped": self.skip, "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    """Which tiers of one ladder to try for one task; index i is ladder[i]."""

    ladder: tuple[int, ...]
    tiers: tuple[TierPlan, ...] = field(default_factory=tuple)

    @property
    def skipped(self) -> tuple[int, ...]:
        return tuple(t.tier for t in self.tiers if t.skip)

    def skips(self, index: int) -> bool:
        return bool(self.tiers) and self.tiers[index].skip

    @property
    def expected_cost_usd(self) -> float | None:
        """V of the whole plan from the bottom of the ladder (None if some cost is unknown)."""
        if not self.tiers:
            return None
        first = self.tiers[0]
        return first.expected_if_skipped_usd if first.skip else first.expected_if_tried_usd


def expected_cost(pass_rates: Sequence[float], costs: Sequence[float]) -> float:
    """Expected cost of trying tiers in order until one passes (all of them if none does):
    c_0 + (1 - p_0) * (c_1 + (1 - p_1) * (... c_n))."""
    if len(pass_rates) != len(costs):
        raise ValueError("one pass rate per cost")
    total = 0.0
    for p, c in zip(reversed(pass_rates), reversed(costs), strict=True):
        total = c + (1.0 - p) * total
    return total


def _usd(x: float) -> str:
    return f"${x:.6f}"


def plan(ladder: Sequence[int], stats: Mapping[int, TierStats], min_observations: int,
         estimates: Mapping[int, float] | None = None) -> Plan:
    """The cheapest-in-expectation subset of `ladder` (the top tier always kept).

    `stats`: measured (task, tier) figures by tier; `estimates`: cost per attempt to use for
    tiers with too few observations (and no observations at all). Deterministic in its
    inputs, so every worker holding the same statistics makes the same decision.
    """
    estimates = estimates or {}
    n = len(ladder)
    out: list[TierPlan] = []
    v_next: float | None = 0.0  # V of the kept tiers above the current one
    for i in range(n - 1, -1, -1):
        tier = ladder[i]
        s = stats.get(tier)
        obs = s.attempts if s else 0
        known = obs >= min_observations
        estimated = False
        if s is not None and s.attempts > 0:
            cost: float | None = s.mean_cost_usd
        else:
            cost = estimates.get(tier)
            estimated = cost is not None
        p = s.pass_rate if (s is not None and known) else 1.0
        tried = None if cost is None or v_next is None else cost + (1.0 - p) * v_next
        top = i == n - 1
        skipped_v = None if top else v_next
        skip = False
        if top:
            reason = "top of the ladder: never skipped"
        elif not known:
            reason = f"too few observations ({obs} < {min_observations}): kept"
        elif tried is None or skipped_v is None:
            reason = "cost of a tier above unknown: kept"
        else:
            skip = tried > skipped_v
            relation = ">" if skip else "<="
            reason = (f"{_usd(cost or 0.0)} + (1 - {p:.3f}) x {_usd(skipped_v)} = "
                      f"{_usd(tried)} {relation} {_usd(skipped_v)} (tiers above): "
                      + ("skipped" if skip else "kept"))
        out.append(TierPlan(tier=tier, observations=obs, pass_rate=p if known else None,
                            mean_cost_usd=cost, estimated=estimated,
                            expected_if_tried_usd=tried, expected_if_skipped_usd=skipped_v,
                            skip=skip, reason=reason))
        v_next = skipped_v if skip else tried
    return Plan(ladder=tuple(ladder), tiers=tuple(reversed(out)))


def explores(job_id: str, tier: int, rate: float) -> bool:
    """Whether this job tries `tier` although the plan skips it: a fixed hash of (job, tier),
    so the explored share is `rate`, the same jobs explore on every run and in every
    worker, and different tiers are explored by different jobs."""
    if rate <= 0.0:
        return False
    digest = hashlib.sha256(f"cascade\0{job_id}\0{tier}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < rate


def start_index(p: Plan, index: int, job_id: str, explore_rate: float) -> int:
    """Where a job starts: its routed start `index`, or the first tier above it that the
    plan keeps (or that this job explores)."""
    for i in range(index, len(p.ladder)):
        if not p.skips(i) or explores(job_id, p.ladder[i], explore_rate):
            return i
    return len(p.ladder) - 1  # pragma: no cover - the top tier is never skipped


def escalation_order(p: Plan, index: int, job_id: str, explore_rate: float) -> list[int]:
    """Ladder indices to try after a failure at `index`: the tiers above it that are kept
    (or explored by this job), in order, then the skipped ones as a last resort for when
    every kept tier has no usable model (all failed over, or a pin excludes them)."""
    above = range(index + 1, len(p.ladder))
    kept = [i for i in above if not p.skips(i) or explores(job_id, p.ladder[i], explore_rate)]
    return kept + [i for i in above if i not in kept]
