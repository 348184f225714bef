"""Token helpers for the simulator's ``usage`` blocks, truncation and logprobs.

Counting is batchroute's own (``batchroute.tokens``, real tiktoken with the
offline cl100k_base), so the sim's usage matches the router's estimates and
stays identical from run to run.
"""

from __future__ import annotations

from batchroute.tokens import count_messages, count_text, encoding, message_text

__all__ = ["count_messages", "count_text", "encode", "encoding", "message_text", "token_pieces",
           "truncate"]


def encode(text: str) -> list[int]:
    # Prompts are user data: "<|endoftext|>" in a document is text, not a control token.
    return encoding().encode(text, disallowed_special=())


def truncate(text: str, max_tokens: int) -> str:
    tokens = encode(text)
    if len(tokens) <= max_tokens:
        return text
    return encoding().decode(tokens[:max(0, max_tokens)])


def token_pieces(text: str) -> list[tuple[str, bytes]]:
    """Each token of ``text`` as (display string, raw bytes), for ``logprobs.content``."""
    enc = encoding()
    pieces = []
    for token in encode(text):
        raw = enc.decode_single_token_bytes(token)
        pieces.append((raw.decode("utf-8", errors="replace"), raw))
    return pieces
