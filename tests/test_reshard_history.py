"""The change history across --reshard (productd.store.reshard_history): carried with the
products, and a cursor from before the reshard resumed on the new shards. The pure rules first,
checked against brute force over random histories and cursors; then the live service."""

from __future__ import annotations

from collections import Counter

import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from service import TIMEOUT, assert_problem, uid
from test_feed import Feed

from productd.actors.routing import shard_for
from productd.store.changes import EXPIRED, LOST, OK, VOID, int_to_bytes
from productd.store.record import pack_fields
from productd.store.reshard_history import FOREIGN, Origins, carry, old_shard


def rec(at: int, rev: int) -> bytes:
    return pack_fields(1.0, 1, None, at, at, rev, None)


@st.composite
def histories(draw):
    """Old shards' histories: (seq, product, record or None), numbered per shard, with product
    ids that route to that shard among `old`, timestamps that grow per shard."""
    old = draw(st.integers(1, 4))
    products = [f"p{i}" for i in range(draw(st.integers(1, 12)))]
    owned = {s: [p for p in products if shard_for(p, old) == s] for s in range(old)}
    result = []
    for s in range(old):
        seq, at, rows = draw(st.integers(0, 50)), 0, []
        for _ in range(draw(st.integers(0, 15)) if owned[s] else 0):
            seq += draw(st.integers(1, 3))
            at += draw(st.integers(0, 5))
            product = draw(st.sampled_from(owned[s]))
            rows.append((seq, product, None if draw(st.integers(0, 5)) == 0 else rec(at, seq)))
        result.append(rows)
    return old, result


@settings(max_examples=300, deadline=None)
@given(histories(), st.integers(1, 5), st.data())
def test_an_old_cursor_gets_every_change_it_had_not_seen_in_per_product_order(drawn, new, data):
    old, hist = drawn
    covered = [old_shard(h, 0) for h in hist]
    base = max(o.head for o in covered)
    carried = carry(hist, [{seq: "o" for seq, _, packed in h if packed is None} for h in hist], base, new, shard_for)
    # Each new shard's carried changes end with a marker (an empty void) that says where they end.
    assert all(c.changes[-1] == (c.end, VOID, int_to_bytes(c.end)) for c in carried)
    changes, origins = [c.changes[:-1] for c in carried], [c.origins for c in carried]
    # The deletes keep their owner under their new numbers.
    assert all(c.owners == {seq: "o" for seq, _, packed in c.changes if packed is None} for c in carried)
    # Every change went to its product's new owner, numbered after base, in per-product order.
    assert Counter((p, r) for rows in changes for _, p, r in rows) == Counter((p, r) for h in hist for _, p, r in h)
    for target, rows in enumerate(changes):
        assert [seq for seq, _, _ in rows] == list(range(base + 1, base + 1 + len(rows)))
        assert all(shard_for(p, new) == target for _, p, _ in rows)
    heads = [data.draw(st.integers(o.oldest, o.head)) for o in covered]
    seen = {(s, seq) for s, h in enumerate(hist) for seq, _, _ in h if seq <= heads[s]}
    unseen = {(s, seq) for s, h in enumerate(hist) for seq, _, _ in h if seq > heads[s]}
    delivered: list[tuple[int, int]] = []
    for target in range(new):
        packed = Origins(covered, origins[target], carried[target].end).pack()
        status, after = Origins.unpack(packed).translate(heads)
        assert status == OK and after <= carried[target].end
        delivered += [(s, seq) for new_seq, s, seq in origins[target] if new_seq > after]
    assert unseen <= set(delivered), unseen - set(delivered)
    assert len(delivered) == len(set(delivered))
    # Per product, what comes again is a suffix of what was seen, then the unseen: in order.
    where = {(s, seq): p for s, h in enumerate(hist) for seq, p, _ in h}
    for product in set(where.values()):
        mine = [o for o in delivered if where[o] == product]
        assert mine == sorted(mine)
        again = [o for o in mine if o in seen]
        assert mine[:len(again)] == again


def test_translate_refuses_foreign_expired_and_lost_cursors():
    hist = [[(5, "a", rec(1, 5)), (6, "", int_to_bytes(6)), (1 << 32, VOID, int_to_bytes(6))], []]
    covered = [old_shard(h, 0) for h in hist]
    origins = Origins(covered, [], 100)
    assert origins.translate([5, 0, 0]) == (FOREIGN, 0)  # three old shards? it had two
    assert origins.translate([3, 0]) == (EXPIRED, 0)  # before what was kept
    assert origins.translate([(1 << 32) + 1, 0]) == (LOST, 0)  # after the old head
    assert origins.translate([6, 0]) == (OK, 100)  # saw everything: after what was carried
    assert covered[0].voids == [(6, 6), (6, 1 << 32)]
    assert origins.translate([7, 0]) == (LOST, 0)  # inside a void: its changes are gone


# ---------------------------------------------------------------- the live service


def start(start_service, data, shards: int, *extra):
    return start_service(shards=shards, workers=1, extra_args=["--data-dir", str(data), *extra],
                         env={"PRODUCTD_DURABILITY": "batch"})


def test_a_feed_cursor_from_before_a_reshard_resumes_on_the_new_shards(start_service, tmp_path):
    data = tmp_path / "data"
    svc = start(start_service, data, 2)
    pid = uid("carry")
    products = [f"{pid}-{i}" for i in range(12)]
    feed = Feed(svc, f"ids={','.join(products)}")
    sent = []
    for round_ in range(6):
        batch = [{"product_id": p, "price": float(round_), "stock": round_ * 10 + i} for i, p in enumerate(products)]
        assert requests.post(svc.url + "/events", json=batch, timeout=TIMEOUT).status_code == 202
        sent += [(e["product_id"], e["price"], e["stock"]) for e in batch]
    seen = feed.take(30)  # a part: the rest is what the cursor has not seen
    feed.close()
    assert len(seen) == 30
    cursor = seen[-1]["id"]
    etags = {p: requests.get(f"{svc.url}/products/{p}", timeout=TIMEOUT).json()["etag"] for p in products}
    assert svc.stop() == 0, svc.log_tail()

    svc = start(start_service, data, 3, "--reshard")
    resumed = Feed(svc, f"ids={','.join(products)}", last_event_id=cursor)
    assert resumed.status == 200, resumed.body()
    got = []
    while not {(p, 5.0) for p in products} <= {(c[0], c[1]) for c in got}:  # until every newest state
        event = resumed.next()
        assert event is not None and event["event"] == "change", event
        got.append((event["data"]["product_id"], event["data"]["price"], event["data"]["stock"]))
    seen_changes = [(e["data"]["product_id"], e["data"]["price"], e["data"]["stock"]) for e in seen]
    unseen = set(sent) - set(seen_changes)
    assert unseen <= set(got), unseen - set(got)
    for p in products:  # per product: what comes again comes first, then the rest, in order
        mine = [c for c in got if c[0] == p]
        assert mine == [c for c in sent if c[0] == p][-len(mine):], (p, mine)
    assert len(got) <= len(unseen) + len(seen_changes)
    # The stream goes on with the new shards' changes; the products kept their ETags.
    assert all(requests.get(f"{svc.url}/products/{p}", timeout=TIMEOUT).json()["etag"] == etags[p]
               for p in products)
    requests.post(svc.url + "/events", json=[{"product_id": products[0], "price": 99.0, "stock": 1}],
                  timeout=TIMEOUT)
    event = resumed.next()
    assert (event["data"]["product_id"], event["data"]["price"]) == (products[0], 99.0), event
    resumed.close()
    # After one more restart the old cursor still resumes, and sees what came after the reshard too.
    assert svc.stop() == 0, svc.log_tail()
    svc = start(start_service, data, 3)
    again = Feed(svc, f"ids={','.join(products)}", last_event_id=cursor)
    assert again.status == 200, again.body()
    later = []
    wanted = {(p, 5.0) for p in products} | {(products[0], 99.0)}
    while not wanted <= set(later):  # each shard's changes come in order, the shards interleaved
        event = again.next()
        assert event is not None and event["event"] == "change", event
        later.append((event["data"]["product_id"], event["data"]["price"]))
    assert later.index((products[0], 99.0)) > later.index((products[0], 5.0))
    again.close()
    # A cursor of a count this service was not resharded from names the problem.
    body = assert_problem(requests.get(svc.url + "/changes", params={"since": "c1-5-0-0-0-0-0"},
                                       timeout=TIMEOUT), 400)
    assert "5 shards" in body["detail"], body
