"""Flower never answers the network without authentication.

Why: Flower's default address is "" (every interface) and it has no authentication unless
told (`--basic_auth` / FLOWER_BASIC_AUTH, `--auth` with an OAuth provider); its pages list
tasks with job ids, workers and the broker, and its API can revoke tasks and shut workers
down. So when `celery -A workers flower` starts without authentication:

- no address given: it binds to 127.0.0.1 only, and says so (a warning on stderr);
- a loopback address: it starts, with the same warning;
- a non-loopback address: it refuses to start, unless BATCHROUTE_FLOWER_ALLOW_NO_AUTH=1
  (e.g. behind an authenticating proxy), in which case it warns.

Flower reads its options (command line, FLOWER_* variables, flowerconfig.py) into
tornado's global `options` before it starts its HTTP server, so the decision is taken
there: `install` wraps `flower.command.Flower.start_http_server`. `decide` is the pure part.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger("batchroute.flower")

ALLOW_ENV = "BATCHROUTE_FLOWER_ALLOW_NO_AUTH"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Decision:
    address: str  # the address to bind to
    refuse: str | None = None  # why Flower must not start
    warning: str | None = None


def _is_loopback(address: str) -> bool:
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def decide(address: str, has_auth: bool, unix_socket: bool, allow_no_auth: bool) -> Decision:
    """Where Flower may listen, given its options."""
    if has_auth or unix_socket:
        return Decision(address)
    if not address:
        if allow_no_auth:
            return Decision(address, warning=f"Flower has no authentication and listens on "
                            f"every interface ({ALLOW_ENV}=1)")
        return Decision(LOOPBACK, warning=(
            "Flower has no authentication (set FLOWER_BASIC_AUTH=user:password): it listens "
            "on 127.0.0.1 only"))
    if _is_loopback(address):
        return Decision(address, warning=(
            f"Flower has no authentication (set FLOWER_BASIC_AUTH=user:password); it "
            f"listens on {address} only"))
    if allow_no_auth:
        return Decision(address, warning=f"Flower has no authentication and listens on "
                        f"{address} ({ALLOW_ENV}=1)")
    return Decision(address, refuse=(
        f"refusing to start Flower on {address} without authentication: its pages and API "
        "(tasks, workers, revoke, shutdown) would answer anyone. Set "
        f"FLOWER_BASIC_AUTH=user:password (or --auth with OAuth), listen on 127.0.0.1, or "
        f"set {ALLOW_ENV}=1 if a proxy in front of it authenticates"))


def _allowed() -> bool:
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")


def apply(options: Any) -> None:
    """Apply `decide` to Flower's parsed tornado options: rebind, warn, or exit."""
    decision = decide(str(getattr(options, "address", "") or ""),
                      bool(getattr(options, "basic_auth", None) or getattr(options, "auth", "")),
                      bool(getattr(options, "unix_socket", "")), _allowed())
    if decision.refuse:
        log.error("flower_refused", reason=decision.refuse)
        print(f"batchroute: {decision.refuse}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    if decision.warning:
        log.warning("flower_without_auth", message=decision.warning)
        print(f"batchroute: WARNING: {decision.warning}", file=sys.stderr, flush=True)
    options.address = decision.address


def install() -> None:
    """Wrap Flower's HTTP server start with `apply` (once; only when Flower is installed)."""
    try:
        from flower import command
    except ImportError:
        return
    flower_cls = command.Flower
    if getattr(flower_cls, "_batchroute_guarded", False):
        return
    original = flower_cls.start_http_server

    def start_http_server(self: Any) -> Any:
        apply(self.options)
        return original(self)

    flower_cls.start_http_server = start_http_server
    flower_cls._batchroute_guarded = True
