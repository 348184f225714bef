"""Fork safety: what a process built before a fork is not shared with the child.

Why: an application that creates a `Client` at module level and then runs in a prefork
Celery pool (or gunicorn, multiprocessing) forks with the SQLAlchemy engines' pooled
connections open; parent and child then talk over the same sockets and get each other's
replies (corrupted queries, hangs). After a fork the child drops (without closing: the
sockets are the parent's) every pooled connection and gets fresh locks; it reconnects on
first use. Redis clients need nothing here: redis-py's ConnectionPool checks the pid on
every checkout and resets itself in a child.
"""

from __future__ import annotations

import multiprocessing.util
import os
import sys
import threading
from typing import Any

_installed = False


def _forget_kombu_pools() -> None:
    """Replace kombu's after-fork close of inherited pools (see the module docstring)."""
    registry = getattr(multiprocessing.util, "_afterfork_registry", None)
    if registry is None or "kombu.resource" not in sys.modules:
        return
    for key, pool in list(registry.items()):
        func = key[-1] if isinstance(key, tuple) and key else None
        if getattr(func, "__qualname__", "") != "_after_fork_cleanup_resource" or \
                getattr(func, "__module__", "") != "kombu.resource":
            continue
        registry.pop(key, None)
        try:
            pool._dirty.clear()
            pool._resource.queue.clear()
            pool._closed = True
        except AttributeError:  # pragma: no cover - another kombu's pool layout
            pass


def _after_fork_in_child() -> None:
    _forget_kombu_pools()
    store: Any = sys.modules.get("batchroute.store.engine")
    if store is None:  # nothing built yet
        return
    store._engines_lock = threading.Lock()  # it may have been held at the fork
    package: Any = sys.modules.get("batchroute.store")
    if package is not None:  # the same lock under its re-exported name
        package._engines_lock = store._engines_lock
    for engine in list(store._engines.values()):
        engine.dispose(close=False)  # forget the parent's connections, do not close them


def install() -> None:
    """Register the after-fork hook once per process (idempotent)."""
    global _installed
    if not _installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _installed = True
