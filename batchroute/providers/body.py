"""Reading a provider's reply body with a size cap, counted on decoded bytes.

Why not `response.read()`: it keeps whatever the server sends (a 200 MB body became a
1.1 GB process and a 200 MB row), and a gzip bomb of a few KB inflates to gigabytes.
Here the raw stream is read chunk by chunk, gzip/deflate are inflated with a bounded
`max_length` (so even one compressed chunk never inflates past the cap), and the read
stops as soon as the decoded size passes `max_bytes`.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import httpx

_GZIP = ("gzip", "x-gzip")
_DEFLATE = ("deflate",)


class ReplyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"reply body larger than max_reply_bytes={limit} (decoded)")
        self.limit = limit


class BadEncoding(Exception):
    """A Content-Encoding the body does not match (corrupt gzip, and the like)."""


def _inflate(raw: Iterator[bytes], wbits: int, room: int) -> Iterator[bytes]:
    """Decoded chunks of a zlib/gzip stream, never more than `room` + 1 bytes in all."""
    d = zlib.decompressobj(wbits)
    produced = 0
    try:
        for chunk in raw:
            data = chunk
            while data:
                out = d.decompress(data, max(1, room + 1 - produced))
                produced += len(out)
                if out:
                    yield out
                if produced > room:
                    return
                data = d.unconsumed_tail
                if not out and not data:
                    break
            if d.eof:
                return
        tail = d.flush()
        if tail:
            yield tail
    except zlib.error as e:
        raise BadEncoding(f"body does not decode as its Content-Encoding ({e})") from None


def _deflate_wbits(first: bytes) -> int:
    """'deflate' is zlib-wrapped by the RFC, raw deflate by some servers: tell them apart."""
    return zlib.MAX_WBITS if first[:1] == b"\x78" else -zlib.MAX_WBITS


def read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    """The decoded body of a streamed response, or ReplyTooLarge past `max_bytes`."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    declared = response.headers.get("content-length", "")
    if not encoding and declared.isdigit() and int(declared) > max_bytes:
        raise ReplyTooLarge(max_bytes)  # said so up front: not a byte read
    chunks: list[bytes] = []
    size = 0
    source: Iterator[bytes]
    if encoding in _GZIP:
        source = _inflate(response.iter_raw(), 16 + zlib.MAX_WBITS, max_bytes)
    elif encoding in _DEFLATE:
        raw = response.iter_raw()
        first = next(raw, b"")

        def _again() -> Iterator[bytes]:
            yield first
            yield from raw

        source = _inflate(_again(), _deflate_wbits(first), max_bytes)
    elif encoding in ("", "identity"):
        source = response.iter_raw()
    else:  # br, zstd...: httpx's own decoder; its chunks are counted as they come
        try:
            source = response.iter_bytes()
        except httpx.DecodingError as e:
            raise BadEncoding(str(e)) from None
    try:
        for chunk in source:
            size += len(chunk)
            if size > max_bytes:
                raise ReplyTooLarge(max_bytes)
            chunks.append(chunk)
    except httpx.DecodingError as e:
        raise BadEncoding(str(e)) from None
    return b"".join(chunks)


def keep(response: httpx.Response, content: bytes) -> httpx.Response:
    """The streamed response, now holding its decoded body as if `read()` had run, for the
    adapters (`.content`, `.text`, `.json()`). Setting `_content` is what httpx's own
    `read()` does; building a second Response instead cost ~35 us a call."""
    response._content = content
    return response
