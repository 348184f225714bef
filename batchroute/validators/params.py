"""Reading a spec's parameters, and resolving the operator's custom callables.

A spec comes from job input (untrusted): errors name the spec and the field, and only
the operator's mapping is ever imported, never a name a job line supplies.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping
from typing import Any

from batchroute.validators.base import ValidatorError

_MISSING: Any = object()


class _Params:
    """Reads one spec's parameters with errors that name the spec and the field, so
    whoever wrote the job line can fix it without reading this module."""

    def __init__(self, spec: Mapping[str, Any], ctx: str) -> None:
        self._spec = spec
        self.ctx = ctx
        self._used: set[str] = {"type"}

    def error(self, message: str) -> ValidatorError:
        return ValidatorError(f"{self.ctx}: {message}")

    def has(self, key: str) -> bool:
        self._used.add(key)
        return key in self._spec

    def raw(self, key: str) -> Any:
        self._used.add(key)
        return self._spec.get(key, _MISSING)

    def string(self, key: str, default: str | None = None) -> str:
        value = self.raw(key)
        if value is _MISSING and default is not None:
            return default
        if not isinstance(value, str) or not value:
            raise self.error(f"{key!r} must be a non-empty string")
        return value

    def str_list(self, key: str, default: list[str] | None = None) -> list[str]:
        value = self.raw(key)
        if value is _MISSING and default is not None:
            return list(default)
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(item, str) and item for item in value)
        ):
            raise self.error(f"{key!r} must be a non-empty list of strings")
        return list(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise self.error(f"{key!r} must be true or false")
        return value

    def number(self, key: str) -> float:
        value = self.raw(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise self.error(f"{key!r} must be a number")
        return float(value)

    def positive_int(self, key: str) -> int | None:
        value = self.raw(key)
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.error(f"{key!r} must be a positive integer")
        return value

    def rest(self) -> dict[str, Any]:
        """Everything not yet read: the pass-through parameters of a custom check."""
        extra = {k: v for k, v in self._spec.items() if k not in self._used}
        self._used.update(extra)
        return extra

    def reject_unknown(self, known: frozenset[str]) -> None:
        """Checked before any parameter is read, so a typo ("choice" for "choices")
        is reported as the typo rather than as the missing parameter."""
        unknown = sorted(str(k) for k in self._spec if k != "type" and k not in known)
        if unknown:
            expected = ", ".join(sorted(known)) or "none"
            raise self.error(f"unknown parameter {unknown[0]!r} (expected: {expected})")


def _resolve_callable(p: _Params, field: str, name: str, custom: Mapping[str, str]) -> Any:
    """Look `name` up in the operator's mapping and import it.

    Only the mapping's values are ever imported: a spec comes from job input, and
    letting it name a module would let any job line run arbitrary code on workers.
    """
    path = custom.get(name)
    if path is None:
        hint = ""
        if "." in name or ":" in name:
            hint = "; dotted paths are not accepted in specs, register it in the custom mapping"
        known = ", ".join(sorted(custom)) or "none registered"
        raise p.error(f"{field!r} {name!r} is not a known custom validator (known: {known}){hint}")
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise p.error(f"custom validator {name!r} has a malformed path {path!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for attr in attr_path.split("."):
            target = getattr(target, attr)
    except Exception as exc:  # importing runs module code, which can fail any way it likes
        raise p.error(f"cannot load custom validator {name!r} from {path!r}: {exc}") from exc
    if not callable(target):
        raise p.error(f"custom validator {name!r} ({path!r}) is not callable")
    return target


def _check_signature(p: _Params, func: Any, label: str, *args: Any, **kwargs: Any) -> None:
    """Catch parameters the callable cannot take at ingestion, not on every completion."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # some builtins have no introspectable signature
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise p.error(f"parameters do not fit {label}: {exc}") from exc

