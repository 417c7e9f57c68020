"""The listing's selection over one shard's store: filters, keyset paging and the top of a sort.

Pure logic on a ShardStore (productd.store.memory): the shard calls `select` for a LIST message
and answers the page of its own products; the front end merges the shards' pages with
`merge_pages` (the same sort keys) and takes the first `limit`.

Sorts. Each sort orders products by a key tuple that ends with the product id, so no two
products tie and a key names one place in the order for good (a cursor is such a key):

    product_id    (product_id,)                          ascending
    -product_id   (product_id,)                          descending
    price         (0, price, product_id)                 ascending; (1, 0.0, product_id) without a price
    -price        (0, -price, product_id)                ascending, so highest price first; ties by
                                                         product_id ascending; without a price as above

Products without a price sort last in both price orders (among themselves by product_id).

Filters (a dict, every entry optional; the front end has checked each value):

    user_id        str    the owner is exactly this (bare products have none: never match)
    min_price      float  price >= min_price (no price: never matches)
    max_price      float  price <= max_price (no price: never matches)
    name           str    case-folded; a substring of the case-folded name (bare: never match)
    in_stock       bool   True: stock > 0; False: stock is 0 or never set
    updated_since  int    updated_at (ns since the epoch) >= updated_since

Cost: with `user_id` the shard visits only that owner's products (the store's owner index),
whatever the size of the catalogue; without it every product of the shard is visited.
"""

from __future__ import annotations

import heapq
import math
import struct
from collections.abc import Iterable, Iterator

import msgpack

from productd.store.record import CORE_SIZE

SORTS = ("product_id", "-product_id", "price", "-price")
DEFAULT_SORT = "product_id"
FILTERS = ("user_id", "min_price", "max_price", "name", "in_stock", "updated_since")

# price (float64), stock, version, updated_at: the head of the record core (productd.store.record).
_HEAD = struct.Struct("<dqqq")
_head = _HEAD.unpack_from
_NO_PRICE = 1  # the first item of a price key: products without a price come after every price


def descending(sort: str) -> bool:
    """True when the sort's keys are taken from the largest down (only -product_id)."""
    return sort == "-product_id"


def sort_key(sort: str, product_id: str, packed: bytes) -> tuple:
    """The key of a product in `sort` (see the module docstring)."""
    if sort == "product_id" or sort == "-product_id":
        return (product_id,)
    price = _head(packed)[0]
    if math.isnan(price):
        return (_NO_PRICE, 0.0, product_id)
    return (0, price if sort == "price" else -price, product_id)


def valid_key(sort: str, key: object) -> bool:
    """Whether `key` (from a client's cursor) is a key `sort` could have made."""
    if not isinstance(key, (list, tuple)):
        return False
    if sort in ("product_id", "-product_id"):
        return len(key) == 1 and type(key[0]) is str
    return (
        len(key) == 3
        and type(key[0]) is int and key[0] in (0, _NO_PRICE)
        and type(key[1]) is float and not math.isnan(key[1]) and not math.isinf(key[1])
        and type(key[2]) is str
    )


def matcher(filters: dict):
    """A predicate (product_id, packed) -> bool for the filters, or None when there are none."""
    min_price = filters.get("min_price")
    max_price = filters.get("max_price")
    name = filters.get("name")
    in_stock = filters.get("in_stock")
    since = filters.get("updated_since")
    user_id = filters.get("user_id")
    priced = min_price is not None or max_price is not None
    low = -math.inf if min_price is None else min_price
    high = math.inf if max_price is None else max_price
    if not (priced or name is not None or in_stock is not None or since is not None or user_id is not None):
        return None

    def match(packed: bytes) -> bool:
        price, stock, _, updated_at = _head(packed)
        if priced and not low <= price <= high:  # NaN (no price) fails every comparison
            return False
        if in_stock is not None and (stock > 0) != in_stock:  # never set is -1: not in stock
            return False
        if since is not None and updated_at < since:
            return False
        if user_id is not None or name is not None:
            if len(packed) == CORE_SIZE:
                return False
            owner, product_name = msgpack.unpackb(packed[CORE_SIZE:], raw=False, use_list=False)[:2]
            if user_id is not None and owner != user_id:
                return False
            if name is not None and name not in product_name.casefold():
                return False
        return True

    return match


def candidates(store, filters: dict) -> Iterator[tuple[str, bytes]]:
    """(product id, packed) of what the filters may select: an owner's products through the
    store's index when `user_id` is given, else every product of the shard."""
    user_id = filters.get("user_id")
    if user_id is None:
        return iter(store.items())
    get = store.get_packed
    return ((product_id, get(product_id)) for product_id in store.owned_by(user_id))


def select(store, filters: dict, sort: str, after: tuple | list | None, limit: int) -> list[tuple[str, bytes]]:
    """The first `limit` products of the store that pass `filters`, in `sort` order, strictly
    after the key `after` (None: from the start): [(product_id, packed), ...] in order."""
    rows = candidates(store, filters)
    if "user_id" in filters:  # the index chose the owner's products: no need to read their details for it
        filters = {name: value for name, value in filters.items() if name != "user_id"}
    return pick(rows, filters, sort, after, limit)


def pick(rows: Iterable[tuple[str, bytes]], filters: dict, sort: str, after, limit: int) -> list[tuple[str, bytes]]:
    """`select` over any (product_id, packed) pairs."""
    match = matcher(filters)
    if match is not None:
        rows = ((product_id, packed) for product_id, packed in rows if match(packed))
    reverse = descending(sort)
    if sort in ("product_id", "-product_id"):
        if after is not None:
            edge = after[0]
            if reverse:
                rows = ((product_id, packed) for product_id, packed in rows if product_id < edge)
            else:
                rows = ((product_id, packed) for product_id, packed in rows if product_id > edge)
        take = heapq.nlargest if reverse else heapq.nsmallest
        return take(limit, rows, key=_first)
    keyed = ((sort_key(sort, product_id, packed), product_id, packed) for product_id, packed in rows)
    if after is not None:
        edge = tuple(after)
        keyed = (row for row in keyed if row[0] > edge)
    return [(product_id, packed) for _, product_id, packed in heapq.nsmallest(limit, keyed, key=_first)]


def _first(row: tuple):
    return row[0]


def merge_pages(pages: Iterable[list], sort: str, limit: int) -> list[tuple[str, bytes]]:
    """The first `limit` of several shards' pages, each in `sort` order, in `sort` order."""
    if sort in ("product_id", "-product_id"):
        merged = heapq.merge(*pages, key=_first, reverse=descending(sort))
    else:
        merged = heapq.merge(*pages, key=lambda row: sort_key(sort, row[0], row[1]))
    out = []
    for row in merged:
        if len(out) == limit:
            break
        out.append((row[0], row[1]))
    return out
