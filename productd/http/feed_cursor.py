"""The change feed's cursor: where a subscriber is in every shard's history.

`c1-<n>-<head of shard 0>-<head of shard 1>-...` in hex: the sequence number of the last change
each shard had applied. A listing returns one (the heads when each shard answered it), every
feed event carries one, and a subscriber resumes from one. It names the shard count, so a cursor
from before a reshard is recognised: the shards translate it (productd.store.reshard_history).
"""

from __future__ import annotations

from productd.config import SHARDS

PREFIX = "c1"


class BadCursor(ValueError):
    """Not a cursor of this service (or of another shard count); the message says which."""


def encode(heads: list[int]) -> str:
    return "-".join((PREFIX, format(len(heads), "x"), *(format(head, "x") for head in heads)))


def decode(text: str) -> list[int]:
    """The positions a cursor names, one per shard of the count it was made for (at most the
    most shards there can be)."""
    parts = text.split("-")
    if len(parts) < 3 or parts[0] != PREFIX:
        raise BadCursor(f"{text[:80]!r} is not a change cursor")
    try:
        count, heads = int(parts[1], 16), [int(part, 16) for part in parts[2:]]
    except ValueError:
        raise BadCursor(f"{text[:80]!r} is not a change cursor") from None
    if count != len(heads) or not 1 <= count <= SHARDS.high or any(head < 0 for head in heads):
        raise BadCursor(f"{text[:80]!r} is not a change cursor")
    return heads
