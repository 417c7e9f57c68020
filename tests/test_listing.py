"""The listing (GET /products without ids): the selection over a shard's store, the owner index,
cursors and the query checks as pure logic; the shard's LIST handler in process; and the live
service checked against a brute-force oracle over random catalogues (hypothesis)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
import requests
from frames import RecordingShard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service import TIMEOUT, assert_problem

from productd.actors import protocol
from productd.actors.routing import shard_for
from productd.http import listing as http_listing
from productd.http.problems import Problem
from productd.store import catalogue, listing
from productd.store.memory import ShardStore
from productd.store.record import pack_fields, unpack

USERS = ["u1", "u2", "u3"]
NAMES = ["Red Shoe", "blue shoe", "HAT", "hat stand", "Shoelace", "mug"]

# ---------------------------------------------------------------- the oracle


def oracle(products: dict[str, dict], filters: dict, sort: str) -> list[str]:
    """Product ids passing `filters` in `sort` order, by brute force over plain dicts
    ({"user_id", "name", "price", "stock", "updated_at_ns"}), as docs/listing.md says."""
    out = []
    for product_id, p in products.items():
        if "user_id" in filters and p["user_id"] != filters["user_id"]:
            continue
        if "min_price" in filters and (p["price"] is None or p["price"] < filters["min_price"]):
            continue
        if "max_price" in filters and (p["price"] is None or p["price"] > filters["max_price"]):
            continue
        if "name" in filters and (p["name"] is None or filters["name"].casefold() not in p["name"].casefold()):
            continue
        if "in_stock" in filters and ((p["stock"] or 0) > 0) != filters["in_stock"]:
            continue
        if "updated_since" in filters and p["updated_at_ns"] < filters["updated_since"]:
            continue
        out.append(product_id)
    if sort == "product_id":
        return sorted(out)
    if sort == "-product_id":
        return sorted(out, reverse=True)
    priced = [i for i in out if products[i]["price"] is not None]
    unpriced = sorted(i for i in out if products[i]["price"] is None)  # last in both directions
    sign = 1 if sort == "price" else -1
    return sorted(priced, key=lambda i: (sign * products[i]["price"], i)) + unpriced


def _plain(packed: bytes) -> dict:
    p = unpack(packed)
    return {"user_id": p.user_id, "name": p.name, "price": p.price, "stock": p.stock, "updated_at_ns": p.updated_at_ns}


# ---------------------------------------------------------------- strategies

product_ids = st.text(alphabet="abcAB019-_.~", min_size=1, max_size=4).filter(lambda s: s not in (".", ".."))
prices = st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.5, 10.0]), st.floats(0, 100, allow_nan=False))
stocks = st.one_of(st.none(), st.integers(0, 3))
catalogued = st.tuples(st.sampled_from(USERS), st.sampled_from(NAMES))
records = st.builds(
    lambda price, stock, updated, details: pack_fields(
        price, stock, None, updated, details=None if details is None else (*details, None, ())),
    prices, stocks, st.integers(0, 10), st.one_of(st.none(), catalogued),
)
catalogues = st.dictionaries(product_ids, records, max_size=40)
filter_sets = st.fixed_dictionaries({}, optional={
    "user_id": st.sampled_from([*USERS, "nobody"]),
    "min_price": st.sampled_from([0.0, 1.0, 2.5, 50.0]),
    "max_price": st.sampled_from([0.0, 2.5, 10.0, 100.0]),
    "name": st.sampled_from(["shoe", "HAT", "s", "zz", "Red"]),
    "in_stock": st.booleans(),
    "updated_since": st.integers(0, 11),
})


def _shard_filters(filters: dict) -> dict:
    return {k: (v.casefold() if k == "name" else v) for k, v in filters.items()}


def _stores(products: dict[str, bytes], shards: int) -> list[ShardStore]:
    stores = [ShardStore() for _ in range(shards)]
    for product_id, packed in products.items():
        stores[shard_for(product_id, shards)].put(product_id, packed)
    return stores


def _page_through(stores, filters, sort, limit):
    """Every page to the end as the front end builds them: [[ids of a page], ...]."""
    pages, after = [], None
    shard_filters = _shard_filters(filters)
    for _ in range(1000):
        answers = [listing.select(s, shard_filters, sort, after, limit + 1) for s in stores]
        merged = listing.merge_pages(answers, sort, limit + 1)
        page = merged[:limit]
        pages.append([product_id for product_id, _ in page])
        if len(merged) <= limit:
            return pages
        after = listing.sort_key(sort, *page[-1])
    raise AssertionError("paging did not end")


# ---------------------------------------------------------------- pure logic


@settings(max_examples=300, deadline=None)
@given(catalogues, filter_sets, st.sampled_from(listing.SORTS), st.integers(1, 7), st.integers(1, 4))
def test_pages_across_shards_are_the_oracle_in_order(products, filters, sort, limit, shards):
    expected = oracle({i: _plain(p) for i, p in products.items()}, filters, sort)
    pages = _page_through(_stores(products, shards), filters, sort, limit)
    got = [product_id for page in pages for product_id in page]
    assert got == expected
    assert all(len(page) == limit for page in pages[:-1])
    assert len(pages[-1]) <= limit and (len(pages) == 1 or pages[-1])  # no empty last page after a full one


ops = st.lists(st.tuples(
    st.sampled_from(["put", "delete", "event"]), st.sampled_from(["a", "b", "c", "d"]), records,
), max_size=30)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_the_owner_index_follows_puts_deletes_and_events(steps):
    store = ShardStore()
    for op, product_id, packed in steps:
        if op == "put":
            store.put(product_id, packed)
        elif op == "delete":
            store.put(product_id, None)
        else:
            store.apply(product_id, 1.0, 2, None, 99, 0)
    for user in [*USERS, "nobody"]:
        assert set(store.owned_by(user)) == {i for i, p in store.items() if unpack(p).user_id == user}
    assert all(ids for ids in store._by_user.values())  # no empty sets are kept


def test_a_user_filter_visits_only_that_owners_products():
    store = ShardStore()
    for i in range(1000):
        store.put(f"bare-{i}", pack_fields(1.0, 1, None, 1))
    store.put("mine", pack_fields(1.0, 1, None, 1, details=("me", "x", None, ())))
    visited = list(listing.candidates(store, {"user_id": "me"}))
    assert [product_id for product_id, _ in visited] == ["mine"]


def test_products_without_a_price_sort_last_both_ways():
    store = ShardStore()
    store.put("a", pack_fields(None, 1, None, 1))
    store.put("b", pack_fields(2.0, 1, None, 1))
    store.put("c", pack_fields(1.0, 1, None, 1))
    assert [i for i, _ in listing.select(store, {}, "price", None, 10)] == ["c", "b", "a"]
    assert [i for i, _ in listing.select(store, {}, "-price", None, 10)] == ["b", "c", "a"]
    assert [i for i, _ in listing.select(store, {"min_price": 0.0}, "price", None, 10)] == ["c", "b"]


def test_cursor_round_trip_and_refusals():
    filters = {"user_id": "u1", "name": "shoe"}
    cursor = http_listing.encode_cursor("price", (0, 2.5, "p1"), filters)
    assert cursor.isascii() and "=" not in cursor
    assert list(http_listing.decode_cursor(cursor, "price", dict(reversed(filters.items())))) == [0, 2.5, "p1"]
    with pytest.raises(ValueError, match="sort=price"):
        http_listing.decode_cursor(cursor, "-price", filters)
    with pytest.raises(ValueError, match="other filters"):
        http_listing.decode_cursor(cursor, "price", {"user_id": "u2", "name": "shoe"})
    for garbage in ["x", "!!!", "AAAA", cursor[:-3], http_listing.encode_cursor("price", ("p1",), filters)]:
        with pytest.raises(ValueError, match="not a cursor"):
            http_listing.decode_cursor(garbage, "price", filters)


def _bad(query: str) -> set[str]:
    with pytest.raises(Problem) as info:
        http_listing.parse_query(query)
    assert info.value.status_code == 400
    return {p["name"] for p in info.value.extra["parameters"]}


@pytest.mark.parametrize(("query", "names"), [
    ("colour=red", {"colour"}),
    ("colour=red&size=2&limit=5", {"colour", "size"}),
    ("user_id=", {"user_id"}),
    ("user_id=a%20b", {"user_id"}),
    ("user_id=..", {"user_id"}),
    ("min_price=-1", {"min_price"}),
    ("max_price=abc", {"max_price"}),
    ("min_price=nan&max_price=inf", {"min_price", "max_price"}),
    ("min_price=1e400", {"min_price"}),
    ("name=", {"name"}),
    ("name=" + "x" * 201, {"name"}),
    ("name=a%07b", {"name"}),
    ("in_stock=yes", {"in_stock"}),
    ("in_stock=True", {"in_stock"}),
    ("updated_since=yesterday", {"updated_since"}),
    ("updated_since=2026-02-30T00:00:00Z", {"updated_since"}),
    ("updated_since=2026-01-01T00:00:00", {"updated_since"}),
    ("sort=name", {"sort"}),
    ("sort=", {"sort"}),
    ("limit=0", {"limit"}),
    ("limit=1001", {"limit"}),
    ("limit=-1", {"limit"}),
    ("limit=1.5", {"limit"}),
    ("limit=10&limit=20", {"limit"}),
    ("cursor=", {"cursor"}),
    ("cursor=abc", {"cursor"}),
    ("ids=", {"ids"}),
])
def test_bad_query_values_are_named(query, names):
    assert _bad(query) == names


def test_good_queries_parse():
    q = http_listing.parse_query("user_id=u1&min_price=1&max_price=2.5&name=Shoe&in_stock=false"
                                 "&updated_since=2026-12-03T13:00:00.5%2B01:00&sort=-price&limit=1000")
    assert q.filters == {"user_id": "u1", "min_price": 1.0, "max_price": 2.5, "name": "shoe", "in_stock": False,
                         "updated_since": int(datetime(2026, 12, 3, 12, 0, tzinfo=UTC).timestamp()) * 10**9
                         + 500_000_000}
    assert (q.sort, q.limit, q.after) == ("-price", 1000, None)
    # an unescaped '+' arrives as a space, and is read as '+'
    assert http_listing.parse_query("updated_since=2026-12-03T13:00:00+01:00").filters["updated_since"] == \
        int(datetime(2026, 12, 3, 12, 0, tzinfo=UTC).timestamp()) * 10**9
    q = http_listing.parse_query("")
    assert (q.filters, q.sort, q.limit) == ({}, "product_id", 100)


# ---------------------------------------------------------------- the shard's handler, in process


def _handle(shard, *bodies):
    return shard.handle(protocol.FrameReader().feed(b"".join(protocol.frame(b) for b in bodies)))


def test_the_shard_lists_behind_writes_and_keeps_the_index():
    shard = RecordingShard()
    address = b"\0lister"
    fields = {"user_id": "u1", "name": "Red Shoe", "price": 3.0, "stock": 1}
    _handle(
        shard,
        protocol.Write.pack(address, 1, catalogue.CREATE, "p1", fields, None, None),
        protocol.Write.pack(address, 2, catalogue.CREATE, "p2", {**fields, "price": 1.0}, None, None),
        protocol.Write.pack(address, 3, catalogue.PATCH, "p1", {"user_id": "u2"}, None, None),
        protocol.List.pack(address, 4, {"user_id": "u1"}, "price", None, 10),
        protocol.Write.pack(address, 5, catalogue.DELETE, "p2", None, None, None),
        protocol.List.pack(address, 6, {"user_id": "u1"}, "price", None, 10),
        protocol.List.pack(address, 7, {"user_id": "u2", "name": "shoe"}, "product_id", ("p0",), 10),
    )
    answers = {request_id: payload for _, request_id, payload in shard.sent}
    head, page = answers[4]
    assert head == 3 and [product_id for product_id, _ in page] == ["p2"]
    assert answers[6] == [4, []]
    assert [product_id for product_id, _ in answers[7][1]] == ["p1"]
    assert shard.store.owned_by("u1") == set()
    assert shard.handle(protocol.FrameReader().feed(
        protocol.stop_frame() + protocol.frame(protocol.List.pack(address, 8, {}, "price", None, 1))))
    assert shard.sent[-1] == (address, 8, protocol.UNAVAILABLE)


def test_a_list_the_store_cannot_answer_is_logged_not_fatal():
    shard = RecordingShard()
    shard.store.put("p", pack_fields(1.0, 1, None, 1))
    _handle(shard, protocol.List.pack(b"\0x", 1, {}, "price", ("not", "a", "key", "at all"), 5))
    assert shard.sent == [(b"\0x", 1, [0, None])]


# ---------------------------------------------------------------- the live service


def _list_all(url: str, query: dict, limit: int) -> list[list[dict]]:
    pages, cursor = [], None
    for _ in range(2000):
        params = {**query, "limit": limit, **({"cursor": cursor} if cursor else {})}
        r = requests.get(url + "/products", params=params, timeout=TIMEOUT)
        assert r.status_code == 200, (params, r.text)
        body = r.json()
        assert set(body) == {"products", "next_cursor", "changes_cursor"}
        assert body["changes_cursor"].startswith("c1-")
        pages.append(body["products"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
    raise AssertionError("paging did not end")


def _ns(text: str) -> int:
    head, _, frac = text[:-1].partition(".")
    seconds = int(datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp())
    return seconds * 10**9 + int(frac.ljust(9, "0"))


_live_steps = st.lists(st.one_of(
    st.tuples(st.just("create"), product_ids, catalogued, prices, stocks),
    st.tuples(st.just("event"), product_ids, prices, stocks),
    st.tuples(st.just("delete"), product_ids),
), min_size=1, max_size=8)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from service import Productd

    svc = Productd(tmp_path_factory.mktemp("listing"), shards=3, workers=1)
    svc.start()
    try:
        yield svc
    finally:
        svc.kill()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=_live_steps, filters=filter_sets, sort=st.sampled_from(listing.SORTS), limit=st.integers(1, 6),
       since_pick=st.integers(0, 1000))
def test_live_listing_pages_are_the_oracle(live, steps, filters, sort, limit, since_pick):
    """Random writes (catalogue creates, events, deletes) grow one service's catalogue example
    after example; each listing, paged to the end, is the oracle over every product the service
    has (read back with a multi-get: the listing's selection is checked here, not the merge
    rules), with no product lost or repeated."""
    url = live.url
    known = live.__dict__.setdefault("known_ids", set())
    for step in steps:
        if step[0] == "create":
            _, product_id, (user, name), price, stock = step
            doc = {"product_id": product_id, "user_id": user, "name": name, "price": price, "stock": stock}
            r = requests.post(url + "/products", json=doc, timeout=TIMEOUT)
            assert r.status_code in (201, 409), r.text
        elif step[0] == "event":
            _, product_id, price, stock = step
            event = {"product_id": product_id, "stock": stock if stock is not None else 0}
            if price is not None:
                event["price"] = price
            assert live.post(event).status_code == 202
        else:
            r = requests.delete(f"{url}/products/{step[1]}", timeout=TIMEOUT)
            assert r.status_code in (204, 404), r.text
        known.add(step[1])
    r = requests.get(url + "/products", params={"ids": ",".join(sorted(known))}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    state = {p["product_id"]: {**p, "updated_at_ns": _ns(p["updated_at"])} for p in r.json()["products"]}
    if "updated_since" in filters:  # one of the products' own times, or a moment after them all
        times = sorted(p["updated_at"] for p in state.values())
        filters["updated_since"] = times[since_pick % len(times)] if times and since_pick < 900 else \
            datetime.fromtimestamp(time.time() + 60, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    query = {k: ("true" if v is True else "false" if v is False else v) for k, v in filters.items()}
    if sort != "product_id" or since_pick % 2:
        query["sort"] = sort
    oracle_filters = {**filters}
    if "updated_since" in filters:
        oracle_filters["updated_since"] = _ns(filters["updated_since"])
    expected = oracle(state, oracle_filters, sort)
    pages = _list_all(url, query, limit)
    got = [p["product_id"] for page in pages for p in page]
    assert got == expected, (query, got, expected)
    assert all(len(page) == limit for page in pages[:-1])
    for page in pages:
        for doc in page:
            assert doc == {k: v for k, v in state[doc["product_id"]].items() if k != "updated_at_ns"}


def test_live_listing_sees_a_write_it_follows(live):
    for i in range(20):
        r = requests.post(live.url + "/products", json={"user_id": "ryw", "name": f"n{i}", "price": i}, timeout=TIMEOUT)
        assert r.status_code == 201, r.text
        product_id = r.json()["product_id"]
        body = requests.get(live.url + "/products", params={"user_id": "ryw", "sort": "-price", "limit": 1},
                            timeout=TIMEOUT).json()
        assert [p["product_id"] for p in body["products"]] == [product_id]
        assert (body["next_cursor"] is None) == (i == 0)


def test_live_bad_queries_get_400_naming_them(live):
    for query, names in [
        ("colour=red&limit=5", {"colour"}),
        ("limit=0&sort=up", {"limit", "sort"}),
        ("min_price=-3", {"min_price"}),
        ("updated_since=now", {"updated_since"}),
        ("cursor=nope", {"cursor"}),
    ]:
        r = requests.get(f"{live.url}/products?{query}", timeout=TIMEOUT)
        body = assert_problem(r, 400)
        assert {p["name"] for p in body["parameters"]} == names, body
        assert all(name in body["detail"] for name in names)
    first = requests.get(live.url + "/products", params={"limit": 1, "sort": "price"}, timeout=TIMEOUT).json()
    if first["next_cursor"]:
        for other in [{"sort": "-price"}, {"sort": "price", "in_stock": "true"}]:
            r = requests.get(live.url + "/products", params={**other, "cursor": first["next_cursor"]}, timeout=TIMEOUT)
            assert "cursor" in assert_problem(r, 400)["detail"]


def test_names_match_case_insensitively():
    store = ShardStore()
    store.put("p", pack_fields(1.0, 1, None, 1, details=("u", "Big RED Shoe", None, ())))
    for needle in ["red", "RED SH", "big red shoe", "e"]:
        assert [i for i, _ in listing.select(store, {"name": needle.casefold()}, "product_id", None, 1)] == ["p"]
    assert listing.select(store, {"name": "blue"}, "product_id", None, 1) == []


def test_live_changes_cursor_is_each_shards_head(live):
    def heads() -> list[int]:
        body = requests.get(live.url + "/products", params={"limit": 1}, timeout=TIMEOUT).json()
        prefix, count, *rest = body["changes_cursor"].split("-")
        assert (prefix, int(count, 16)) == ("c1", live.shards)
        return [int(head, 16) for head in rest]

    before = heads()
    r = requests.post(live.url + "/products", json={"user_id": "heads", "name": "n"}, timeout=TIMEOUT)
    assert r.status_code == 201
    after = heads()
    assert sum(after) == sum(before) + 1 and all(a >= b for a, b in zip(after, before, strict=True))
    assert requests.head(live.url + "/products", timeout=TIMEOUT).status_code == 200



@pytest.mark.parametrize("since", ["1078-10-13T12:28:23.60420-23:21", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"])
def test_live_updated_since_far_from_now_is_a_bound_not_an_error(live, since):
    """Found by schemathesis: a date-time before 1970 or after 2262 overflowed the shard's message (500)."""
    assert 0 <= http_listing._updated_since(since) <= 2**63 - 1
    owner = f"far-{since[:4]}"
    r = requests.post(live.url + "/products", json={"user_id": owner, "name": "n"}, timeout=TIMEOUT)
    assert r.status_code == 201, r.text
    body = requests.get(live.url + "/products", params={"user_id": owner, "updated_since": since},
                        timeout=TIMEOUT).json()
    assert [p["product_id"] for p in body["products"]] == ([] if since.startswith("9999") else [r.json()["product_id"]])
