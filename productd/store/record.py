"""One product's record, packed, and the rules that change it: events and catalogue writes.

A record is a 48-byte core, then the product's catalogue details if it has any:

    price (float64, NaN = never set) | stock | version (int64, -1 = never set)
    | updated_at | created_at (int64 nanoseconds since the epoch) | revision (int64)
    [ msgpack (user_id, name, description, images[, image_results]) ]

A bare product (one only events have touched) is the core alone: packing keeps a million of
them in the memory budget, where a tuple of boxed numbers costs about three times as much.
The revision is the owning shard's change sequence number of the product's last change
(productd.store.changes): it changes with every change applied, events included, and is what
the product's ETag shows. A product's catalogue details exist only together with its owner
(`user_id`) and `name`.

The details tail is versioned by its length: four items is the form from before the image
pipeline (every image pending), five adds `image_results`, a map url -> result of the images
whose job has ended: ("done", key, format, width, height, bytes) or ("failed", reason). Only
URLs in `images` have a result; a URL without one is pending (docs/images.md).
"""

from __future__ import annotations

import json
import math
import struct
from typing import NamedTuple

import msgpack

_CORE = struct.Struct("<dqqqqq")
CORE_SIZE = _CORE.size
UNSET = -1
_NAN = float("nan")
_pack_core = _CORE.pack
_unpack_core = _CORE.unpack_from
_packb = msgpack.Packer(use_bin_type=True).pack
# The catalogue fields, in the order the details tail holds them.
DETAILS = ("user_id", "name", "description", "images")


class Product(NamedTuple):
    """A record as callers see it: None where a field was never set."""

    price: float | None
    stock: int | None
    version: int | None
    updated_at_ns: int
    created_at_ns: int
    revision: int
    user_id: str | None = None
    name: str | None = None
    description: str | None = None
    images: tuple[str, ...] = ()
    image_results: dict | None = None  # url -> result tuple; None or absent: every image pending


DONE, FAILED = "done", "failed"  # the states of an image result; no result is "pending"


def merge(
    packed: bytes | None,
    price: float | None,
    stock: int | None,
    version: int | None,
    now_ns: int,
    revision: int = 0,
) -> bytes | None:
    """Merge one event: the new packed record, or None when the event is stale and changes nothing.

    An event whose version is <= the stored version is stale and ignored whole. An event
    without a version applies in arrival order and keeps the stored version. Fields the event
    leaves out keep their value; the details are kept as they are.
    """
    if packed is None:
        return _pack_core(
            _NAN if price is None else price,
            UNSET if stock is None else stock,
            UNSET if version is None else version,
            now_ns, now_ns, revision,
        )
    old_price, old_stock, old_version, _, created_at_ns, _ = _unpack_core(packed)
    if version is not None:
        if version <= old_version:
            return None
    else:
        version = old_version
    core = _pack_core(
        old_price if price is None else price,
        old_stock if stock is None else stock,
        version,
        now_ns,
        created_at_ns,
        revision,
    )
    return core if len(packed) == CORE_SIZE else core + packed[CORE_SIZE:]


def pack_fields(
    price: float | None,
    stock: int | None,
    version: int | None,
    updated_at_ns: int,
    created_at_ns: int | None = None,
    revision: int = 0,
    details: tuple | None = None,
) -> bytes:
    """A record from its fields, None meaning never set; `details` is (user_id, name,
    description, images) or None for a bare product. created_at defaults to updated_at."""
    core = _pack_core(
        _NAN if price is None else price,
        UNSET if stock is None else stock,
        UNSET if version is None else version,
        updated_at_ns,
        updated_at_ns if created_at_ns is None else created_at_ns,
        revision,
    )
    if details is None:
        return core
    user_id, name, description, images, *rest = details
    results = rest[0] if rest else None
    if results:  # only the URLs shown have a result; none at all keeps the four-item form
        results = {url: tuple(results[url]) for url in images if url in results}
    if results:
        return core + _packb((user_id, name, description, tuple(images), results))
    return core + _packb((user_id, name, description, tuple(images)))


_LEGACY = struct.Struct("<dqqq")  # schema 1: price, stock, version, updated_at


def upgrade(packed: bytes | None) -> bytes | None:
    """A record as a productd from before the catalogue packed it (32 bytes), in today's form."""
    if packed is None or len(packed) != _LEGACY.size:
        return packed
    price, stock, version, updated_at_ns = _LEGACY.unpack(packed)
    return _pack_core(price, stock, version, updated_at_ns, updated_at_ns, 0)


def unpack_fields(packed: bytes) -> tuple:
    """The raw core (price, stock, version, updated_at_ns, created_at_ns, revision): NaN and -1 unset."""
    return _unpack_core(packed)


def revision(packed: bytes) -> int:
    return _unpack_core(packed)[5]


def details(packed: bytes) -> tuple | None:
    """(user_id, name, description, images[, image_results]) or None for a bare product."""
    if len(packed) == CORE_SIZE:
        return None
    return tuple(msgpack.unpackb(packed[CORE_SIZE:], raw=False, use_list=False))


def unpack(packed: bytes) -> Product:
    price, stock, version, updated_at_ns, created_at_ns, rev = _unpack_core(packed)
    core = (
        None if math.isnan(price) else price,
        None if stock == UNSET else stock,
        None if version == UNSET else version,
        updated_at_ns,
        created_at_ns,
        rev,
    )
    if len(packed) == CORE_SIZE:
        return Product(*core)
    return Product(*core, *msgpack.unpackb(packed[CORE_SIZE:], raw=False, use_list=False))


def with_image_result(packed: bytes, url: str, result: tuple, now_ns: int, revision: int) -> bytes | None:
    """The record with `result` for image `url`, as a change (new revision and updated_at);
    None when it changes nothing: no such product details, `url` not among its images (the
    list was replaced since the job was queued), or the same result already there."""
    if len(packed) == CORE_SIZE:
        return None
    user_id, name, description, images, *rest = details(packed)
    if url not in images:
        return None
    results = dict(rest[0]) if rest and rest[0] else {}
    result = tuple(result)
    if results.get(url) == result:
        return None
    results[url] = result
    price, stock, version, _, created_at_ns, _ = _unpack_core(packed)
    core = _pack_core(price, stock, version, now_ns, created_at_ns, revision)
    return core + _packb((user_id, name, description, images, results))


def pending_images(packed: bytes) -> list[str]:
    """The image URLs of a record that have no result yet."""
    if len(packed) == CORE_SIZE:
        return []
    _, _, _, images, *rest = details(packed)
    results = rest[0] if rest and rest[0] else {}
    return [url for url in images if url not in results]


NO_DETAILS_COLUMNS = (None, None, None, None, None)  # user_id, name, description, images, image_results


def columns(packed: bytes) -> tuple:
    """The record as the plain column values both stores keep (the shard file, PostgreSQL):
    price, stock, version, updated_at_ns, created_at_ns, revision, user_id, name, description,
    images (JSON text), image_results (JSON text or None); None where a field was never set."""
    price, stock, version, updated_at_ns, created_at_ns, revision = _unpack_core(packed)
    if len(packed) == CORE_SIZE:
        described = NO_DETAILS_COLUMNS
    else:
        user_id, name, description, images, *rest = details(packed)
        results = rest[0] if rest and rest[0] else None
        described = (user_id, name, description, json.dumps(images), None if results is None else json.dumps(results))
    return (
        None if math.isnan(price) else price,
        None if stock == UNSET else stock,
        None if version == UNSET else version,
        updated_at_ns,
        created_at_ns,
        revision,
        *described,
    )
