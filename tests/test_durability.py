"""Durable shards against the real service: graceful restarts, crashes of the whole service
(kill -9 of every process group of its session), a single shard killed under load, resharding.

What is asserted is only what each durability mode promises:
- sync: every event answered 202 is on disk, so after any crash each product is at or past
  the highest version acknowledged for it.
- batch: a crash may lose what was not yet committed, but never leaves a torn or mixed record,
  and never goes back past what the shard files held (read with sqlite, as an operator would)
  shortly before the crash.
- both: a graceful stop loses nothing.

Crash tests make every field of an event a function of (product, version), so a record mixed from
two events is detectable. The random timings are seeded; the seed is in every failure message.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import zlib
from pathlib import Path

import pytest
import requests
from service import TIMEOUT, ServiceError, session_leftovers, session_pids, uid
from test_datadir import changes, committed_rows, refused_start, shard_rows, tree_state

JOIN_DEADLINE = 60.0  # seconds; only so a wedged client thread fails the test


# ---------------------------------------------------------------- helpers


def start_durable(start_service, data_dir: Path, durability: str, shards: int = 4, extra: tuple = ()):
    return start_service(
        shards=shards,
        workers=2,
        extra_args=["--data-dir", str(data_dir), *extra],
        env={"PRODUCTD_DURABILITY": durability},
    )


def read_all(svc, ids) -> dict[str, dict | None]:
    """GET every product: its JSON, or None for 404."""
    out: dict[str, dict | None] = {}
    with requests.Session() as http:
        for product_id in ids:
            r = http.get(f"{svc.url}/products/{product_id}", timeout=TIMEOUT)
            assert r.status_code in (200, 404), f"GET {product_id}: {r.status_code} {r.text}"
            out[product_id] = r.json() if r.status_code == 200 else None
    return out


def post_ok(svc, body, content_type: str = "application/json") -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = svc.post_raw(data, content_type)
    assert r.status_code == 202, f"{r.status_code} {r.text}"


def crash(svc) -> None:
    """kill -9 every process group of the service's session (the supervisor's and gunicorn's) at once."""
    sid = svc.pid
    groups = {sid}
    for pid in session_pids(sid):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for group in sorted(groups, key=lambda g: g != sid):  # the shards' group first
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    svc.kill()  # reaps the supervisor, sweeps anything forked meanwhile
    left = session_leftovers(sid, 30)
    if left:
        raise ServiceError(f"processes of a killed service still alive: {left}")


def salt(product_id: str) -> int:
    return zlib.crc32(product_id.encode()) % 1000


def price_of(product_id: str, version: int) -> float:
    return version * 0.5 + salt(product_id)  # exact in binary: JSON and SQLite keep it bit for bit


def stock_of(product_id: str, version: int) -> int:
    return version * 3 + salt(product_id)


class VersionedLoad:
    """Client threads posting full versioned events; each product belongs to one thread, whose
    versions for it only go up. Records what was sent and the highest version answered 202."""

    def __init__(self, url: str, products: list[str], state: dict, seed: int, threads: int = 4) -> None:
        self.url = url
        self.state = state  # product -> {"next": int, "acked": int, "sent": set}
        self.stopping = threading.Event()
        self.acks = 0
        self.statuses: dict[int, int] = {}
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(products[i::threads], random.Random(seed + i)), daemon=True)
            for i in range(threads)
        ]

    def __enter__(self) -> VersionedLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(JOIN_DEADLINE)
        assert not any(t.is_alive() for t in self.threads), "a client thread is stuck"

    def _run(self, own: list[str], rnd: random.Random) -> None:
        http = requests.Session()
        state = self.state
        while not self.stopping.is_set():
            batch = rnd.sample(own, rnd.randint(1, len(own)))
            events = []
            for product_id in batch:
                s = state[product_id]
                v = s["next"]
                s["next"] = v + rnd.randint(1, 3)
                s["sent"].add(v)
                events.append({"product_id": product_id, "price": price_of(product_id, v),
                               "stock": stock_of(product_id, v), "version": v})
            try:
                r = http.post(self.url + "/events", json=events, timeout=TIMEOUT)
            except requests.RequestException as exc:
                if not self.stopping.is_set():
                    with self.lock:
                        self.errors.append(repr(exc))
                    time.sleep(0.05)
                continue
            with self.lock:
                self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
            if r.status_code == 202:
                for e in events:
                    s = state[e["product_id"]]
                    s["acked"] = max(s["acked"], e["version"])
                with self.lock:
                    self.acks += 1
            elif r.status_code == 503:
                time.sleep(0.02)
        http.close()

    def wait_for_acks(self, n: int, deadline: float = 30.0) -> None:
        end = time.monotonic() + deadline
        while self.acks < n:
            assert time.monotonic() < end, f"fewer than {n} acknowledged requests in {deadline}s: {self.statuses}"
            time.sleep(0.01)


def new_state(products: list[str]) -> dict:
    return {p: {"next": 1, "acked": 0, "sent": set()} for p in products}


def assert_consistent(product_id: str, rec: dict, state: dict, context: str) -> None:
    """The record is exactly one event that was sent: not torn, not mixed, not invented."""
    v = rec["version"]
    assert v in state[product_id]["sent"], f"{context}: {product_id} has version {v}, never sent: {rec}"
    assert (rec["price"], rec["stock"]) == (price_of(product_id, v), stock_of(product_id, v)), (
        f"{context}: {product_id} is a mixed record: {rec}, version {v} had "
        f"price {price_of(product_id, v)} stock {stock_of(product_id, v)}"
    )


# ---------------------------------------------------------------- 1. graceful restart


@pytest.mark.parametrize(
    "durability, extra",
    [
        # A commit interval far longer than the test: what survives was committed by the graceful stop.
        ("batch", ("--commit-interval", "600")),
        ("sync", ()),
    ],
)
def test_restart_reads_back_every_product_exactly(start_service, tmp_path, durability, extra):
    data = tmp_path / "data"
    p = uid("restart")
    svc = start_durable(start_service, data, durability, extra=extra)

    many = [f"{p}-m{i}" for i in range(600)]
    for start in range(0, len(many), 200):
        post_ok(svc, [
            {"product_id": pid, "price": i * 0.25, "stock": i, **({"version": i} if i % 2 else {})}
            for i, pid in enumerate(many[start:start + 200], start)
        ])  # fmt: skip
    # NDJSON partial updates without version: keep price and version, change stock.
    post_ok(svc, b"\n".join(json.dumps({"product_id": pid, "stock": 7}).encode() for pid in many[::3]),
            "application/x-ndjson")
    # Versions, stale events, partial updates.
    post_ok(svc, {"product_id": f"{p}-a", "price": 5.0, "stock": 50, "version": 5})
    post_ok(svc, {"product_id": f"{p}-a", "price": 3.0, "stock": 30, "version": 3})  # stale
    post_ok(svc, {"product_id": f"{p}-a", "price": 7.0, "version": 7})
    post_ok(svc, {"product_id": f"{p}-b", "price": 1.5})
    post_ok(svc, {"product_id": f"{p}-b", "stock": 2})
    post_ok(svc, {"product_id": f"{p}-c", "price": 9.99, "stock": 1, "version": 4})
    post_ok(svc, {"product_id": f"{p}-c", "stock": 0})  # no version: keeps 4
    post_ok(svc, {"product_id": f"{p}-d", "stock": 2**63 - 1})
    post_ok(svc, {"product_id": f"{p}-e", "price": 0, "stock": 0, "version": 0})
    post_ok(svc, {"product_id": f"{p}-f", "price": 1e-7, "version": 2**63 - 1})
    special = [f"{p}-{x}" for x in "abcdef"]
    ids = many + special

    before = read_all(svc, ids)
    assert all(before[i] is not None for i in ids)
    assert [before[f"{p}-a"][k] for k in ("price", "stock", "version")] == [7.0, 50, 7]
    assert [before[f"{p}-b"][k] for k in ("price", "stock", "version")] == [1.5, 2, None]
    assert [before[f"{p}-c"][k] for k in ("price", "stock", "version")] == [9.99, 0, 4]
    assert [before[f"{p}-d"][k] for k in ("price", "stock", "version")] == [None, 2**63 - 1, None]
    assert [before[f"{p}-e"][k] for k in ("price", "stock", "version")] == [0, 0, 0]
    assert before[many[3]]["stock"] == 7 and before[many[3]]["version"] == 3 and before[many[3]]["price"] == 0.75

    assert svc.stop(signal.SIGTERM) == 0, svc.log_tail()
    svc.assert_no_leftovers()

    again = start_durable(start_service, data, durability, extra=extra)
    after = read_all(again, ids)
    lost = [i for i in ids if after[i] != before[i]]
    assert not lost, f"{len(lost)} products differ after restart, e.g. {lost[0]}: {before[lost[0]]} -> {after[lost[0]]}"

    # Versions still guard after the restart: a replay is stale, a newer version applies.
    post_ok(again, {"product_id": f"{p}-a", "price": 70.0, "stock": 0, "version": 7})
    assert again.product(f"{p}-a") == before[f"{p}-a"]
    post_ok(again, {"product_id": f"{p}-a", "stock": 1, "version": 8})
    assert [again.product(f"{p}-a")[k] for k in ("price", "stock", "version")] == [7.0, 1, 8]
    assert again.stop() == 0, again.log_tail()


# ---------------------------------------------------------------- 2. and 3. crash of the whole service

ROUNDS = [(0.1, 0.4), (0.4, 0.9), (0.9, 1.5)]  # seconds of load after the first ack, before the kill


def test_crash_in_sync_mode_keeps_every_acknowledged_event(start_service, tmp_path):
    seed = random.randrange(2**32)
    rnd = random.Random(seed)
    data = tmp_path / "data"
    products = [f"{uid('sync')}-{i}" for i in range(24)]
    state = new_state(products)
    svc = start_durable(start_service, data, "sync")
    for round_no, (low, high) in enumerate(ROUNDS):
        context = f"seed {seed}, round {round_no}"
        with VersionedLoad(svc.url, products, state, seed + 10 * round_no) as load:
            load.wait_for_acks(1)
            time.sleep(rnd.uniform(low, high))
            load.stopping.set()
            crash(svc)
        assert set(load.statuses) <= {202, 503}, f"{context}: {load.statuses}"
        svc = start_durable(start_service, data, "sync")
        after = read_all(svc, products)
        for product_id in products:
            acked, rec = state[product_id]["acked"], after[product_id]
            if acked:
                assert rec is not None, f"{context}: {product_id} acknowledged at version {acked} but gone"
                assert rec["version"] >= acked, f"{context}: {product_id} acked {acked}, read back {rec}"
            if rec is not None:
                assert_consistent(product_id, rec, state, context)
    assert sum(1 for s in state.values() if s["acked"]) > len(products) // 2
    assert svc.stop() == 0, svc.log_tail()


def test_crash_in_batch_mode_leaves_consistent_records_and_keeps_commits(start_service, tmp_path):
    seed = random.randrange(2**32)
    rnd = random.Random(seed)
    data = tmp_path / "data"
    products = [f"{uid('batch')}-{i}" for i in range(24)]
    state = new_state(products)
    extra = ("--commit-interval", "0.05")
    svc = start_durable(start_service, data, "batch", extra=extra)
    for round_no, (low, high) in enumerate(ROUNDS):
        context = f"seed {seed}, round {round_no}"
        with VersionedLoad(svc.url, products, state, seed + 10 * round_no) as load:
            load.wait_for_acks(1)
            end = time.monotonic() + 30
            first = {p: r[2] for p, r in committed_rows(data).items() if p in state}
            # Something of this round is committed before the timer starts, so the snapshot below matters.
            while not any(r[2] > first.get(p, -1) for p, r in committed_rows(data).items() if p in state):
                assert time.monotonic() < end, f"{context}: nothing committed within 30s"
                time.sleep(0.02)
            time.sleep(rnd.uniform(low, high))
            committed = {p: r for p, r in committed_rows(data).items() if p in state}  # on disk by now
            load.stopping.set()
            crash(svc)
        assert set(load.statuses) <= {202, 503}, f"{context}: {load.statuses}"
        for product_id, (price, stock, version, _) in committed.items():
            assert_consistent(product_id, {"price": price, "stock": stock, "version": version}, state,
                              f"{context}, in the shard file")
        svc = start_durable(start_service, data, "batch", extra=extra)
        after = read_all(svc, products)
        for product_id in products:
            rec = after[product_id]
            if product_id in committed:
                assert rec is not None, f"{context}: {product_id} was committed ({committed[product_id]}) but is gone"
                assert rec["version"] >= committed[product_id][2], (
                    f"{context}: {product_id} went back past a commit: file had {committed[product_id]}, now {rec}"
                )
            if rec is not None:
                assert_consistent(product_id, rec, state, context)
    assert svc.stop() == 0, svc.log_tail()


# ---------------------------------------------------------------- 4. one shard killed under load


def test_shard_killed_under_load_in_sync_mode_loses_nothing_acknowledged(start_service, tmp_path):
    seed = random.randrange(2**32)
    rnd = random.Random(seed)
    data = tmp_path / "data"
    svc = start_durable(start_service, data, "sync")
    pre = [f"{uid('pre')}-{i}" for i in range(40)]
    post_ok(svc, [{"product_id": q, "price": i + 0.5, "stock": i, "version": 10} for i, q in enumerate(pre)])
    pre_records = read_all(svc, pre)
    victim = 1
    meta = json.loads((data / "productd.json").read_bytes())
    on_victim = set(shard_rows(data / meta["layout"] / f"shard-{victim:03d}.sqlite3")) & set(pre)
    assert on_victim, "no pre-loaded product landed on the victim shard"

    products = [f"{uid('load')}-{i}" for i in range(24)]
    state = new_state(products)
    with VersionedLoad(svc.url, products, state, seed) as load:
        load.wait_for_acks(1)
        time.sleep(rnd.uniform(0.1, 0.6))
        old_pid = svc.shard_pids()[victim]
        os.kill(old_pid, signal.SIGKILL)
        svc.wait_for(
            lambda: (lambda s: s["pid"] != old_pid and s["alive"] and s["ready"])(svc.shard_info()[victim]),
            f"shard {victim} to be restarted", deadline=30,
        )
        acks = load.acks
        load.wait_for_acks(acks + 20)  # the load goes on against the new shard process
    context = f"seed {seed}"
    assert set(load.statuses) <= {202, 503}, f"{context}: {load.statuses}"
    assert not load.errors, f"{context}: client errors while the service was up: {load.errors[:3]}"

    info = svc.shard_info()[victim]
    assert info["restarts"] >= 1 and info["state_lost"] == 0, info
    after = read_all(svc, products)
    for product_id in products:
        acked, rec = state[product_id]["acked"], after[product_id]
        if acked:
            assert rec is not None and rec["version"] >= acked, f"{context}: {product_id} acked {acked}, got {rec}"
        if rec is not None:
            assert_consistent(product_id, rec, state, context)
    # The new shard process read its products from its file: nothing re-sent them.
    now = read_all(svc, pre)
    assert now == pre_records, [q for q in pre if now[q] != pre_records[q]]
    assert svc.stop() == 0, svc.log_tail()


# ---------------------------------------------------------------- 5. resharding


def test_reshard_4_to_7_to_2_keeps_every_product(start_service, tmp_path):
    data = tmp_path / "data"
    p = uid("reshard")
    ids = [f"{p}-{i}" for i in range(400)]
    svc = start_durable(start_service, data, "batch", shards=4)
    post_ok(svc, [{"product_id": q, "price": i * 0.5, "stock": i, **({"version": i} if i % 3 else {})}
                  for i, q in enumerate(ids)])
    post_ok(svc, [{"product_id": q, "stock": 1} for q in ids[::5]])
    expected = read_all(svc, ids)
    assert svc.stop() == 0, svc.log_tail()

    # Another count without --reshard: refused, naming both counts, nothing touched.
    before = tree_state(data)
    refusal = refused_start(tmp_path / "refused", data, shards=7)
    assert refusal.code == 2, refusal.stderr[-3000:]
    words = refusal.message.replace(";", " ").replace(",", " ").split()
    assert "4" in words and "7" in words and "--reshard" in words, refusal.message
    assert not changes(before, tree_state(data)), changes(before, tree_state(data))

    svc = start_durable(start_service, data, "batch", shards=7, extra=("--reshard",))
    assert len(svc.shard_info()) == 7
    got = read_all(svc, ids)
    assert got == expected, [q for q in ids if got[q] != expected[q]][:5]
    post_ok(svc, [{"product_id": q, "price": 1000.0 + i, "version": 10_000} for i, q in enumerate(ids[::7])])
    expected = read_all(svc, ids)
    assert svc.stop() == 0, svc.log_tail()
    assert json.loads((data / "productd.json").read_bytes())["shards"] == 7

    svc = start_durable(start_service, data, "batch", shards=2, extra=("--reshard",))
    assert len(svc.shard_info()) == 2
    got = read_all(svc, ids)
    assert got == expected, [q for q in ids if got[q] != expected[q]][:5]
    assert svc.stop() == 0, svc.log_tail()
    meta = json.loads((data / "productd.json").read_bytes())
    assert meta["shards"] == 2
    # images/ is the image pipeline's (docs/images.md), beside the layouts and not one of them.
    layouts = sorted(d.name for d in data.iterdir() if d.is_dir() and d.name != "images")
    assert layouts == [meta["layout"]], f"old or unfinished layouts left: {layouts}"
    rows = committed_rows(data)
    assert sorted(rows) == sorted(ids)  # each product once, in the layout in charge
