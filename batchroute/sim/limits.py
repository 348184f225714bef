"""Strict sliding-window rate limits, the kind a provider enforces on an account.

Strict on purpose: a client-side limiter that is even slightly too optimistic must see
429s in tests, not pass because the sim rounded in its favour. Only accepted requests
occupy the window; refused ones cost nothing, as with real providers.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW_S = 60.0


@dataclass
class _Window:
    events: deque[tuple[float, int]] = field(default_factory=deque)
    tokens: int = 0

    def prune(self, now: float, span: float) -> None:
        while self.events and self.events[0][0] <= now - span:
            self.tokens -= self.events.popleft()[1]


@dataclass(frozen=True)
class LimitStatus:
    """Tightest limit of one kind (requests or tokens) across the checked windows."""

    limit: int
    remaining: int
    reset_s: float
    """Seconds until ``remaining`` next goes up (the oldest entry leaves the window)."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    refused_by: str | None = None  # "rpm" or "tpm"
    retry_after_s: float = 0.0
    too_large: bool = False  # the request alone exceeds the tpm limit: it can never pass
    requests: LimitStatus | None = None
    tokens: LimitStatus | None = None


@dataclass(frozen=True)
class Limit:
    key: str
    rpm: int | None
    tpm: int | None


class RateLimiter:
    """Not thread-safe by itself: the engine calls it under its own lock, together with
    the stats update, so a refusal and its counter can never disagree."""

    def __init__(self, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._windows: dict[str, _Window] = {}

    def reset(self) -> None:
        self._windows.clear()

    def acquire(self, limits: list[Limit], tokens: int) -> Decision:
        """Admit one request of ``tokens`` tokens against every limit, or refuse it."""
        active = [lim for lim in limits if lim.rpm is not None or lim.tpm is not None]
        if not active:
            return Decision(allowed=True)
        now = self.clock()
        windows = []
        for lim in active:
            window = self._windows.setdefault(lim.key, _Window())
            window.prune(now, self.window_s)
            windows.append(window)

        refused_by: str | None = None
        retry = 0.0
        too_large = False
        for lim, window in zip(active, windows, strict=True):
            if lim.rpm is not None and len(window.events) + 1 > lim.rpm:
                # the (n - rpm + 1)-th oldest entry must leave before one more fits
                oldest = window.events[len(window.events) - lim.rpm][0]
                retry = max(retry, oldest + self.window_s - now)
                refused_by = refused_by or "rpm"
            if lim.tpm is not None and window.tokens + tokens > lim.tpm:
                refused_by = refused_by or "tpm"
                if tokens > lim.tpm:
                    too_large = True
                    retry = max(retry, self.window_s)
                    continue
                freed, wait = 0, self.window_s
                for ts, used in window.events:
                    freed += used
                    if window.tokens - freed + tokens <= lim.tpm:
                        wait = ts + self.window_s - now
                        break
                retry = max(retry, wait)
        if refused_by is None:
            for window in windows:
                window.events.append((now, tokens))
                window.tokens += tokens
        return Decision(
            allowed=refused_by is None,
            refused_by=refused_by,
            retry_after_s=max(retry, 0.001) if refused_by else 0.0,
            too_large=too_large,
            requests=self._status(active, windows, now, "rpm"),
            tokens=self._status(active, windows, now, "tpm"),
        )

    def _status(self, limits: list[Limit], windows: list[_Window], now: float,
                kind: str) -> LimitStatus | None:
        best: LimitStatus | None = None
        for lim, window in zip(limits, windows, strict=True):
            limit = lim.rpm if kind == "rpm" else lim.tpm
            if limit is None:
                continue
            used = len(window.events) if kind == "rpm" else window.tokens
            reset = window.events[0][0] + self.window_s - now if window.events else 0.0
            status = LimitStatus(limit=limit, remaining=max(0, limit - used),
                                 reset_s=max(0.0, reset))
            if best is None or status.remaining < best.remaining:
                best = status
        return best
