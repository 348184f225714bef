"""A small strict TOML writer, and reading the input config's TOML back."""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batchroute.config import Config

# ------------------------------------------------------------------------------ TOML

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot write {v!r} to TOML")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(str(k))} = {_value(x)}" for k, x in v.items()
                                if x is not None) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(data: Mapping[str, Any], comment: str = "") -> str:
    """Write a config dict as TOML: tables as [sections], anything inside a list inline.

    Small and strict on purpose (the stdlib reads TOML but cannot write it); the result
    is checked by parsing it back.
    """
    out: list[str] = [comment] if comment else []

    def table(path: list[str], d: Mapping[str, Any]) -> None:
        def inline(v: Any) -> bool:  # small leaf tables read better inline: price = {...}
            return len(path) >= 2 and not any(isinstance(x, dict) for x in v.values())

        scalars = [(k, v) for k, v in d.items()
                   if v is not None and (not isinstance(v, dict) or inline(v))]
        subtables = [(k, v) for k, v in d.items() if isinstance(v, dict) and not inline(v)]
        if path and (scalars or not subtables):
            out.append(f"\n[{'.'.join(_key(p) for p in path)}]")
        for k, v in scalars:
            out.append(f"{_key(k)} = {_value(v)}")
        for k, v in subtables:
            table([*path, k], v)

    table([], data)
    text = "\n".join(out).lstrip("\n") + "\n"
    tomllib.loads(text)
    return text


def load_raw_config(config: Config) -> dict[str, Any] | None:
    """The input config's TOML as written, when it came from a file."""
    path = Path(config.source)
    if not path.is_file():
        return None
    data = tomllib.loads(path.read_text("utf-8"))
    sim = data.get("simulator")
    if isinstance(sim, dict) and isinstance(sim.get("replay"), str) and \
            not Path(sim["replay"]).is_absolute():
        sim["replay"] = str((path.resolve().parent / sim["replay"]).resolve())
    return data
