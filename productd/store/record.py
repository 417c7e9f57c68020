"""One product's record, packed, and the rule that merges an event into it.

A record is 32 bytes: price (float64, NaN = never set), stock, version (int64, -1 = never set)
and updated_at (int64 nanoseconds since the epoch). Packing keeps a million products in the
memory budget: a tuple of four boxed numbers costs about three times as much.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

_RECORD = struct.Struct("<dqqq")
UNSET = -1
_NAN = float("nan")


class Product(NamedTuple):
    """A record as callers see it: None where a field was never set."""

    price: float | None
    stock: int | None
    version: int | None
    updated_at_ns: int


def merge(
    packed: bytes | None,
    price: float | None,
    stock: int | None,
    version: int | None,
    now_ns: int,
) -> bytes | None:
    """Return the new packed record, or None when the event is stale and changes nothing.

    An event whose version is <= the stored version is stale and ignored whole. An event
    without a version applies in arrival order and keeps the stored version. Fields the event
    leaves out keep their value.
    """
    if packed is None:
        return pack_fields(price, stock, version, now_ns)
    old_price, old_stock, old_version, _ = _RECORD.unpack(packed)
    if version is not None:
        if version <= old_version:
            return None
    else:
        version = old_version
    return _RECORD.pack(
        old_price if price is None else price,
        old_stock if stock is None else stock,
        version,
        now_ns,
    )


def pack_fields(price: float | None, stock: int | None, version: int | None, updated_at_ns: int) -> bytes:
    """A record from stored columns, None meaning never set."""
    return _RECORD.pack(
        _NAN if price is None else price,
        UNSET if stock is None else stock,
        UNSET if version is None else version,
        updated_at_ns,
    )


unpack_fields = _RECORD.unpack


def unpack(packed: bytes) -> Product:
    price, stock, version, updated_at_ns = _RECORD.unpack(packed)
    return Product(
        None if math.isnan(price) else price,
        None if stock == UNSET else stock,
        None if version == UNSET else version,
        updated_at_ns,
    )
