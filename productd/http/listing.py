"""The listing: `GET /products` without `ids` (docs/listing.md).

The query is checked whole (every bad or unknown parameter is named in one 400 problem), then
every shard is asked at once for its first `limit + 1` products after the cursor's key
(protocol.List, productd.store.listing.select); the answers, each in sort order, are merged and
the first `limit` returned. The one more per shard tells whether anything comes after the page,
so `next_cursor` is null exactly when nothing does.

A LIST travels through each shard's inbox behind everything queued before it, so a listing sent
after a 2xx write sees that write. `changes_cursor` is the change-feed cursor made of each
shard's change head at the moment it answered: a client that lists everything and then follows
`/changes?since=<changes_cursor>` misses no change.

The cursor is opaque to clients: base64url of msgpack [CURSOR_VERSION, sort, key of the last
product returned, a hash of the filters]. A cursor used with another sort or other filters is
refused (400); `limit` may change from page to page.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import hashlib
import math
import re
from urllib.parse import parse_qsl

import falcon
import msgpack
import orjson

from productd.actors import protocol
from productd.actors.client import InboxFull, ShardTimeout, ShardUnavailable
from productd.http import feed_cursor, validation
from productd.http.problems import Problem
from productd.http.render import product_json
from productd.store import listing

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_NAME = 200  # a name is at most 200 characters: a longer substring matches nothing
CURSOR_VERSION = 1
PARAMETERS = frozenset((*listing.FILTERS, "sort", "limit", "cursor"))

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+\- ]\d{2}:\d{2})"
)
_DECIMAL = re.compile(r"\d+(\.\d+)?([eE][+-]?\d+)?|\.\d+")


class Query:
    """A checked listing query."""

    __slots__ = ("filters", "sort", "limit", "after")

    def __init__(self, filters: dict, sort: str, limit: int, after: list | None) -> None:
        self.filters = filters
        self.sort = sort
        self.limit = limit
        self.after = after


async def list_products(client, req: falcon.Request, resp: falcon.Response) -> None:
    """Answer the listing: 200 {"products", "next_cursor", "changes_cursor"}, or a problem."""
    query = parse_query(req.query_string)
    products, heads, more = await fetch(client, query)
    next_cursor = None
    if more and products:
        last_id, last_packed = products[-1]
        next_cursor = encode_cursor(query.sort, listing.sort_key(query.sort, last_id, last_packed), query.filters)
    resp.data = orjson.dumps({
        "products": [product_json(product_id, packed) for product_id, packed in products],
        "next_cursor": next_cursor,
        "changes_cursor": feed_cursor.encode(heads),
    })


async def fetch(client, query: Query) -> tuple[list[tuple[str, bytes]], list[int], bool]:
    """(the page, each shard's change head when it answered, whether more come after the page)."""
    filters, sort, after, limit = query.filters, query.sort, query.after, query.limit

    def pack(address: bytes, request_id: int) -> bytes:
        return protocol.List.pack(address, request_id, filters, sort, after, limit + 1)

    answers = await asyncio.gather(*(client.ask(shard, pack) for shard in range(client.shards)),
                                   return_exceptions=True)
    heads, pages = [], []
    for shard, answer in enumerate(answers):
        if isinstance(answer, BaseException):
            raise _shard_problem(client, shard, answer)
        head, page = answer
        if page is None:
            raise Problem(500, "Listing failed", f"shard {shard} could not answer the listing; it has been logged")
        heads.append(head)
        pages.append(page)
    merged = listing.merge_pages(pages, sort, limit + 1)
    return merged[:limit], heads, len(merged) > limit


def _shard_problem(client, shard: int, exc: BaseException) -> Exception:
    if isinstance(exc, InboxFull):
        return Problem(503, "Shard busy", f"the inbox of shard {shard} is full", headers={"Retry-After": "1"})
    if isinstance(exc, ShardUnavailable):
        doing = "stopping" if client.stopping else "restarting"
        return Problem(503, "Shard unavailable", f"shard {shard} is {doing}", headers={"Retry-After": "1"})
    if isinstance(exc, ShardTimeout):
        return Problem(504, "Shard timeout",
                       f"shard {shard} did not answer within {client.read_timeout}s (--read-timeout)")
    return exc


# ---------------------------------------------------------------- the query


def parse_query(query_string: str) -> Query:
    """The checked query; a 400 problem naming every bad or unknown parameter."""
    values: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for name, value in parse_qsl(query_string or "", keep_blank_values=True):
        if name in values:
            problems.append((name, "is given more than once"))
        values[name] = value
    unknown = sorted(set(values) - PARAMETERS)
    if "ids" in unknown:
        unknown.remove("ids")
        problems.append(("ids", "is a multi-get and takes no listing parameters"
                         if values["ids"] else "is empty: give 1 to 1000 product ids, comma-separated"))
    for name in unknown[:20]:
        problems.append((name, "is not a parameter of the listing, which takes " + ", ".join(sorted(PARAMETERS))))
    filters: dict = {}
    for name, check in _CHECKS.items():
        if name in values:
            try:
                filters[name] = check(values[name])
            except ValueError as exc:
                problems.append((name, str(exc)))
    sort = values.get("sort", listing.DEFAULT_SORT)
    if sort not in listing.SORTS:
        problems.append(("sort", f"must be one of {', '.join(listing.SORTS)}"))
    limit = DEFAULT_LIMIT
    if "limit" in values:
        text = values["limit"]
        if not (text.isascii() and text.isdigit() and len(text) <= 7 and 1 <= int(text) <= MAX_LIMIT):
            problems.append(("limit", f"must be an integer from 1 to {MAX_LIMIT}"))
        else:
            limit = int(text)
    after = None
    if "cursor" in values and not problems:
        try:
            after = decode_cursor(values["cursor"], sort, filters)
        except ValueError as exc:
            problems.append(("cursor", str(exc)))
    if problems:
        raise Problem(
            400, "Invalid query",
            "; ".join(f"{name[:64]}: {detail}" for name, detail in problems),
            kind="invalid-query",
            parameters=[{"name": name[:64], "detail": detail} for name, detail in problems],
        )
    return Query(filters, sort, limit, after)


def _user_id(text: str) -> str:
    if not validation.valid_product_id(text):
        raise ValueError(f"a user id is {validation.PRODUCT_ID_RULE}")
    return text


def _price(text: str) -> float:
    if not (text.isascii() and _DECIMAL.fullmatch(text)):
        raise ValueError("must be a number >= 0 (digits, an optional fraction and exponent)")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("is too large")
    return value + 0.0


def _name(text: str) -> str:
    if not text:
        raise ValueError("is empty: give part of a name")
    if len(text) > MAX_NAME:
        raise ValueError(f"is longer than a name can be ({MAX_NAME} characters)")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text):
        raise ValueError("holds a control character")
    return text.casefold()


def _in_stock(text: str) -> bool:
    if text == "true":
        return True
    if text == "false":
        return False
    raise ValueError("must be true or false")


def _updated_since(text: str) -> int:
    """An RFC 3339 date-time -> nanoseconds since the epoch. A '+' of the offset sent unescaped
    arrives as a space (form encoding), and is read as '+'."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise ValueError("must be an RFC 3339 date-time, e.g. 2026-12-03T12:00:00Z or 2026-12-03T13:00:00.5%2B01:00")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    frac, offset = m.group(7) or "", m.group(8)
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(max(year, 1), month)[1]
            and hour <= 23 and minute <= 59 and second <= 60 and year >= 1):
        raise ValueError("is not a real date and time")
    seconds = calendar.timegm((year, month, day, hour, minute, min(second, 59), 0, 0, 0))
    if offset not in ("Z", "z"):
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            raise ValueError("has an offset out of range")
        shift = hours * 3600 + minutes * 60
        seconds += -shift if offset[0] != "-" else shift
    # Before 1970 every product is newer; past 2262 none is (timestamps are int64 nanoseconds, and
    # the shard's message must hold the bound).
    return min(max(0, seconds * 1_000_000_000 + int(frac.ljust(9, "0") or 0)), 2**63 - 1)


_CHECKS = {
    "user_id": _user_id,
    "min_price": _price,
    "max_price": _price,
    "name": _name,
    "in_stock": _in_stock,
    "updated_since": _updated_since,
}


# ---------------------------------------------------------------- cursors


def filters_digest(filters: dict) -> bytes:
    """8 bytes that change with the checked filters (their order does not matter)."""
    canonical = msgpack.packb(sorted(filters.items()), use_bin_type=True)
    return hashlib.blake2b(canonical, digest_size=8).digest()


def encode_cursor(sort: str, key: tuple, filters: dict) -> str:
    raw = msgpack.packb([CURSOR_VERSION, sort, list(key), filters_digest(filters)], use_bin_type=True)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(text: str, sort: str, filters: dict) -> list:
    """The key a cursor continues after; ValueError saying why it cannot be used here."""
    if not text or len(text) > 2048:
        raise ValueError("is not a cursor of this listing")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        version, cursor_sort, key, digest = msgpack.unpackb(raw, raw=False)
    except Exception:  # not base64, not msgpack, not four items: all the same to the client
        raise ValueError("is not a cursor of this listing") from None
    if version != CURSOR_VERSION or type(cursor_sort) is not str or cursor_sort not in listing.SORTS:
        raise ValueError("is not a cursor of this listing")
    if cursor_sort != sort:
        raise ValueError(f"was made for sort={cursor_sort}, not sort={sort}: page with the same sort and filters")
    if digest != filters_digest(filters):
        raise ValueError("was made for other filters: page with the same filters and sort as the first page")
    if not listing.valid_key(sort, key):
        raise ValueError("is not a cursor of this listing")
    return key
