"""The multi-host mode end to end: real `productd serve` processes on the real RabbitMQ and
PostgreSQL of this machine (PRODUCTD_TEST_BROKER, PRODUCTD_TEST_DATABASE), each "host" a process
session of its own: owner hosts (--role owner), front ends (--role frontend), or one of both.

Every test makes a cluster of its own: a fresh PostgreSQL schema (through the URL's search_path)
migrated by `productd migrate`, and a fresh cluster name, whose queues are deleted afterwards."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path

import pytest
import requests

pytest.importorskip("aio_pika", reason="the cluster extra is not installed: pip install 'productd[cluster]'")
pytest.importorskip("psycopg", reason="the cluster extra is not installed: pip install 'productd[cluster]'")
import aio_pika  # noqa: E402
import psycopg  # noqa: E402
from service import TIMEOUT, Productd, ServiceError, checkout_env, free_port, service_env, session_pids  # noqa: E402

BROKER = os.environ.get("PRODUCTD_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672/")
DATABASE = os.environ.get("PRODUCTD_TEST_DATABASE", "postgresql://postgres@127.0.0.1:5432/test")
SHARDS = 4
DEADLINE = 60.0  # seconds: only so that a hang fails


def _unreachable() -> str | None:
    try:
        psycopg.connect(DATABASE, connect_timeout=10).close()
    except psycopg.Error as exc:
        return f"PostgreSQL at {DATABASE} does not answer ({exc})"

    async def probe():
        connection = await asyncio.wait_for(aio_pika.connect(BROKER), 10)
        await connection.close()

    try:
        asyncio.run(probe())
    except Exception as exc:  # any failure to connect means: skip, with the reason
        return f"RabbitMQ at {BROKER} does not answer ({type(exc).__name__}: {exc})"
    return None


_why = _unreachable()
if _why is not None:
    pytest.skip(_why, allow_module_level=True)


def in_schema(schema: str) -> str:
    """The database URL whose every connection works in `schema`."""
    return f"{DATABASE}{'&' if '?' in DATABASE else '?'}options=-csearch_path%3D{schema}"


def shard_of(product_id: str) -> int:
    """As productd routes (crc32 of the id, docs/design.md), written down here as a user would."""
    return zlib.crc32(product_id.encode()) % SHARDS


def ids_on(shard: int, count: int, label: str) -> list[str]:
    """`count` product ids that live on `shard`."""
    out, n = [], 0
    while len(out) < count:
        candidate = f"{label}-{n}"
        if shard_of(candidate) == shard:
            out.append(candidate)
        n += 1
    return out


class Cluster:
    """One test's cluster: a schema, a name, and every host started on it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.name = f"t{uuid.uuid4().hex[:12]}"
        self.schema = f"test_{self.name}"
        self.database = in_schema(self.schema)
        self.hosts: list[Productd] = []
        with psycopg.connect(DATABASE, autocommit=True) as admin:
            admin.execute(f"CREATE SCHEMA {self.schema}")

    def migrate(self, shards: int = SHARDS) -> None:
        done = subprocess.run([sys.executable, "-m", "productd", "migrate", "--database", self.database,
                               "--shards", str(shards), "--cluster", self.name],
                              env=checkout_env(), capture_output=True, text=True, timeout=DEADLINE)
        assert done.returncode == 0, done.stderr

    def args(self, *extra: str) -> list[str]:
        return ["--broker", BROKER, "--database", self.database, "--cluster", self.name, "--log-format", "text",
                "--heartbeat", "1", *extra]

    def front_end(self, role: str = "frontend", *extra: str) -> Productd:
        host = Productd(self.tmp_path / f"host{len(self.hosts)}", shards=SHARDS, workers=1,
                        extra_args=self.args("--role", role, "--image-workers", "0", *extra),
                        env={"PRODUCTD_DURABILITY": "batch"})
        self.hosts.append(host)
        return host.start()

    def owner_host(self, index: int, hosts: int = 2) -> OwnerHost:
        host = OwnerHost(self.tmp_path / f"host{len(self.hosts)}", shards=SHARDS,
                         extra_args=self.args("--role", "owner", "--owner-hosts", str(hosts),
                                              "--owner-index", str(index), "--image-workers", "0"),
                         env={"PRODUCTD_DURABILITY": "batch"})
        self.hosts.append(host)
        return host.start()

    def cleanup(self) -> None:
        for host in self.hosts:
            host.kill()

        async def delete_queues():
            async with await aio_pika.connect(BROKER) as connection:
                channel = await connection.channel()
                for shard in range(SHARDS):
                    await channel.queue_delete(f"productd.{self.name}.shard.{shard}")

        asyncio.run(delete_queues())
        with psycopg.connect(DATABASE, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


class OwnerHost(Productd):
    """`productd serve --role owner`: no HTTP; ready once its log says it subscribed to every shard."""

    def start(self) -> OwnerHost:
        env = service_env("batch", self.env)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "productd", "serve", "--shards", str(self.shards),
                                          *self.extra_args], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                         cwd=self.log_dir)
        try:
            self.wait_for(lambda: self.proc.poll() is None and self.subscribed() >= self.shards,
                          f"owner host subscribed to its {self.shards} shards", DEADLINE)
        except BaseException:
            self.kill()
            raise
        return self

    def subscribed(self) -> int:
        if self.proc.poll() is not None:
            raise ServiceError(f"owner host exited with {self.proc.returncode}\n{self.log_tail()}")
        return len(set(re.findall(r"shard (\d+): subscribed to", self.log_text())))

    def pids(self) -> set[int]:
        return set(session_pids(self.pid))


def owners(front: Productd) -> list[dict]:
    return sorted(front.readyz().json()["cluster"]["owners"], key=lambda o: o["shard"])


def owner_pid(row: dict) -> int | None:
    """The pid in an owner name (host:pid/shard)."""
    return None if row["owner"] is None else int(row["owner"].split(":")[1].split("/")[0])


def wait_owned(front: Productd, by: dict[int, OwnerHost], deadline: float = DEADLINE) -> list[dict]:
    """Until /readyz says each shard in `by` is owned by a process of that host; the rows."""
    def check():
        rows = owners(front)
        if all(owner_pid(rows[shard]) in host.pids() for shard, host in by.items()):
            return rows
        return None

    return front.wait_for(check, f"shards owned as {sorted((k, h.pid) for k, h in by.items())}", deadline)


def post(front: Productd, product_id: str, price: float, stock: int = 1) -> requests.Response:
    return front.post({"product_id": product_id, "price": price, "stock": stock})


@pytest.fixture
def cluster(tmp_path):
    made = Cluster(tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


# ---- bad configuration: one clear message, exit code 2, nothing started

def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "productd", "serve", "--bind", f"127.0.0.1:{free_port()}",
                           "--image-workers", "0", *args], env=service_env("batch"), capture_output=True,
                          text=True, timeout=DEADLINE)


@pytest.mark.parametrize("case", ["no-database", "durability-none", "owner-index", "unmigrated", "other-shards",
                                  "other-name", "broker-refused", "broker-credentials", "database-refused"])
def test_a_cluster_configured_wrong_is_refused_at_start(cluster, case, tmp_path):
    cluster.migrate()
    good = ["--broker", BROKER, "--database", cluster.database, "--cluster", cluster.name]
    closed = free_port()  # nothing listens there
    args, expected = {
        "no-database": (["--broker", BROKER], "--broker needs --database"),
        "durability-none": ([*good, "--durability", "none"], "--durability none is for one host"),
        "owner-index": ([*good, "--owner-hosts", "2", "--owner-index", "2"], "--owner-index 2 must be below"),
        "unmigrated": (["--broker", BROKER, "--database", in_schema(f"nowhere_{cluster.name}"),
                        "--cluster", cluster.name], "productd migrate"),
        "other-shards": ([*good, "--shards", "8"], "4"),
        "other-name": (["--broker", BROKER, "--database", cluster.database, "--cluster", "another"], cluster.name),
        "broker-refused": (["--broker", f"amqp://guest:guest@127.0.0.1:{closed}/", "--database", cluster.database,
                            "--cluster", cluster.name], f"127.0.0.1:{closed}"),
        "broker-credentials": (["--broker", "amqp://guest:wrong-secret@127.0.0.1:5672/", "--database",
                                cluster.database, "--cluster", cluster.name], "broker amqp://guest:***@"),
        "database-refused": (["--broker", BROKER, "--database", f"postgresql://postgres@127.0.0.1:{closed}/test",
                              "--cluster", cluster.name], f"{closed}"),
    }[case]
    done = _serve(*args)
    assert done.returncode == 2, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert expected in done.stderr, done.stderr
    assert "wrong-secret" not in done.stderr + done.stdout  # a password is never written to the log


def test_migrate_refuses_to_change_a_clusters_shard_count(cluster):
    """productd migrate records the name and the shard count; a host of another count is refused."""
    cluster.migrate()
    done = subprocess.run([sys.executable, "-m", "productd", "migrate", "--database", cluster.database,
                           "--shards", "8", "--cluster", cluster.name], env=checkout_env(), capture_output=True,
                          text=True, timeout=DEADLINE)
    assert done.returncode != 0 and "4" in done.stderr, done.stderr


# ---- one host of both roles

def test_one_host_of_both_roles_keeps_its_state_in_postgresql_across_a_restart(cluster):
    cluster.migrate()
    host = cluster.front_end("both")
    assert host.readyz().json()["cluster"]["broker"] == "ok"
    ids = [f"p-{n}" for n in range(40)]
    for n, product_id in enumerate(ids):
        assert post(host, product_id, n + 0.5, n).status_code == 202
    put = requests.put(f"{host.url}/products/p-0", json={"user_id": "u1", "name": "Lamp", "description": "warm",
                                                         "price": 0.5, "stock": 0}, timeout=TIMEOUT)
    assert put.status_code in (200, 201), put.text
    assert host.stop() == 0, host.log_tail()
    assert "every shard drained its inbox" in host.log_text()

    again = cluster.front_end("both")
    for n, product_id in enumerate(ids):
        got = again.product(product_id)
        assert (got["price"], got["stock"]) == (n + 0.5, n), got
    assert again.product("p-0")["name"] == "Lamp"
    listed = requests.get(f"{again.url}/products?limit=100", timeout=TIMEOUT).json()["products"]
    assert sorted(p["product_id"] for p in listed) == sorted(ids)
    rows = owners(again)
    assert [r["epoch"] for r in rows] == [2] * SHARDS, rows  # each shard taken once per start
    assert sum(r["products"] for r in rows) == len(ids) or again.wait_for(
        lambda: sum(r["products"] for r in owners(again)) == len(ids), "owner heartbeats with product counts")


# ---- two owner hosts, two front ends

def test_two_owner_hosts_share_the_shards_and_any_front_end_reads_what_another_wrote(cluster):
    cluster.migrate()
    host0, host1 = cluster.owner_host(0), cluster.owner_host(1)
    front_a, front_b = cluster.front_end(), cluster.front_end()
    for shard in range(SHARDS):  # a shard is taken at its owner's first delivery
        assert post(front_a, ids_on(shard, 1, "warm")[0], 1.0).status_code == 202
    wait_owned(front_a, {k: (host0 if k % 2 == 0 else host1) for k in range(SHARDS)})

    for shard in range(SHARDS):
        for n, product_id in enumerate(ids_on(shard, 5, "rw")):
            for price in (1.0, 2.0, 3.0 + n):
                assert post(front_a, product_id, price).status_code == 202
            got = front_b.product(product_id)  # the other front end, right after the 202
            assert got["price"] == 3.0 + n, got
    put = requests.put(f"{front_b.url}/products/cat-1", json={"user_id": "u", "name": "Chair", "description": "x"},
                       timeout=TIMEOUT)
    assert put.status_code in (200, 201), put.text
    got = front_a.product("cat-1")
    assert got["name"] == "Chair" and got["etag"] == put.headers["ETag"], got
    for front in (front_a, front_b):
        body = front.readyz().json()
        assert body["status"] == "ready" and body["cluster"]["database"] == "ok", body

    # Versions under concurrent clients through both front ends: the highest version wins,
    # whichever front end, owner host and arrival order it came by.
    versioned = [ids_on(shard, 2, "ver")[n] for shard in range(SHARDS) for n in range(2)]
    highest: dict[str, int] = {}
    lock = threading.Lock()
    failures: list[str] = []

    def client(front: Productd, seed: int) -> None:
        rng, session = random.Random(seed), requests.Session()
        for _ in range(50):
            product_id, version = rng.choice(versioned), rng.randint(1, 10_000)
            r = session.post(f"{front.url}/events", json={"product_id": product_id, "price": float(version),
                                                          "stock": version, "version": version}, timeout=TIMEOUT)
            if r.status_code != 202:
                failures.append(f"{r.status_code} {r.text}")
                continue
            with lock:
                highest[product_id] = max(highest.get(product_id, 0), version)

    clients = [threading.Thread(target=client, args=(front, seed)) for seed, front in
               enumerate([front_a, front_b] * 3)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(DEADLINE)
    assert not failures, failures[:3]
    for product_id, version in highest.items():
        for front in (front_a, front_b):
            got = front.product(product_id)
            assert (got["version"], got["price"], got["stock"]) == (version, float(version), version), got

    metrics = front_a.metrics()
    assert metrics[("productd_cluster_broker_up", "")] == 1
    assert {shard for (name, shard) in metrics if name == "productd_cluster_queue_messages"} == \
        {str(k) for k in range(SHARDS)}


class Writer(threading.Thread):
    """Posts events with rising prices round the products until stopped; keeps the last price
    each product got a 202 for, and every price it sent."""

    def __init__(self, front: Productd, product_ids: list[str]) -> None:
        super().__init__(daemon=True)
        self.front, self.product_ids = front, product_ids
        self.acked: dict[str, float] = {}
        self.sent: dict[str, set[float]] = {p: set() for p in product_ids}
        self.statuses: dict[int, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        session = requests.Session()
        price = 0.0
        while not self.done.is_set():
            for product_id in self.product_ids:
                price += 1.0
                self.sent[product_id].add(price)
                try:
                    r = session.post(f"{self.front.url}/events", json={"product_id": product_id, "price": price,
                                                                       "stock": 1}, timeout=(2, 10))
                    status = r.status_code
                except requests.RequestException:
                    status = 0
                self.statuses[status] = self.statuses.get(status, 0) + 1
                if status == 202:
                    self.acked[product_id] = price
            time.sleep(0.01)

    def stop(self) -> None:
        self.done.set()
        self.join(DEADLINE)

    def check(self, front: Productd) -> None:
        """Every product shows at least its last acknowledged price, and only a price it was sent
        (an event answered 503 or cut off may have been applied: it is not acknowledged, not lost)."""
        assert self.acked, self.statuses
        for product_id, price in self.acked.items():
            got = front.product(product_id)["price"]
            assert got >= price and got in self.sent[product_id], (product_id, got, price, self.statuses)


def test_a_killed_owner_host_loses_no_acknowledged_event_and_the_other_takes_its_shards(cluster):
    cluster.migrate()
    host0, host1 = cluster.owner_host(0), cluster.owner_host(1)
    front = cluster.front_end()
    products = [ids_on(shard, 3, "kill")[n] for shard in range(SHARDS) for n in range(3)]
    writer = Writer(front, products)
    writer.start()
    try:
        wait_owned(front, {k: (host0 if k % 2 == 0 else host1) for k in range(SHARDS)})
        time.sleep(1.0)
        host0.kill()  # the whole host at once, mid-stream
        wait_owned(front, dict.fromkeys(range(SHARDS), host1))
        acked_before = writer.statuses.get(202, 0)
        front.wait_for(lambda: writer.statuses.get(202, 0) > acked_before + 3 * len(products),
                       "events acknowledged again after the failover")
    finally:
        writer.stop()
    writer.check(front)

    # The host comes back: it takes its preferred shards back, and nothing moves backwards.
    host0 = cluster.owner_host(0)
    wait_owned(front, {k: (host0 if k % 2 == 0 else host1) for k in range(SHARDS)})
    writer.check(front)
    assert "handed over to its preferred owner host" in host1.log_text()


def test_a_paused_owner_host_is_fenced_and_rejoins_without_moving_state_backwards(cluster):
    cluster.migrate()
    host0, host1 = cluster.owner_host(0), cluster.owner_host(1)
    front = cluster.front_end()
    products = [ids_on(shard, 2, "pause")[n] for shard in range(SHARDS) for n in range(2)]
    writer = Writer(front, products)
    writer.start()
    paused: list[int] = []
    try:
        wait_owned(front, {k: (host0 if k % 2 == 0 else host1) for k in range(SHARDS)})
        time.sleep(0.5)
        paused = sorted(host0.pids())
        for pid in paused:  # as a host whose VM stalls: alive, silent, holding unsaved work
            os.kill(pid, signal.SIGSTOP)
        wait_owned(front, dict.fromkeys(range(SHARDS), host1))  # the broker gave host1 the shards
        acked = writer.statuses.get(202, 0)
        front.wait_for(lambda: writer.statuses.get(202, 0) > acked + 2 * len(products), "host1 acknowledging")
    finally:
        for pid in paused:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    try:
        # The paused owners wake up fenced (their epoch is gone) or disconnected: they drop what
        # they held and wait again; their host, the preferred one, gets its shards handed back.
        host0.wait_for(lambda: "drops its state" in host0.log_text(), "the paused owners to notice", DEADLINE)
        wait_owned(front, {k: (host0 if k % 2 == 0 else host1) for k in range(SHARDS)})
    finally:
        writer.stop()
    writer.check(front)
    assert all(r["epoch"] >= 3 for r in owners(front) if r["shard"] % 2 == 0), owners(front)


# ---- the broker and the database restart under load

def _restart_commands(what: str) -> list[list[str]]:
    """How this machine restarts the service: the broker's application inside its running node
    (its connections close, its quorum queues stay on disk), or PostgreSQL (fast: sessions cut)."""
    if what == "broker":
        return [["rabbitmqctl", "stop_app"], ["sleep", "2"], ["rabbitmqctl", "start_app"],
                ["rabbitmqctl", "await_startup"]]
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    return [["pg_ctlcluster", "--skip-systemctl-redirect", versions[0] if versions else "15", "main", "restart",
             "--mode", "fast"]]


def _can_restart(what: str) -> str | None:
    tool = "rabbitmqctl" if what == "broker" else "pg_ctlcluster"
    if os.geteuid() != 0:
        return f"restarting the {what} needs root"
    if not any(os.access(os.path.join(d, tool), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep)):
        return f"{tool} is not on PATH: the {what} is not a local service this test can restart"
    return None


@pytest.mark.parametrize("what", ["broker", "database"])
def test_a_restart_of_the_broker_or_the_database_under_load_loses_no_acknowledged_event(cluster, what):
    """Clients see 503s while it is away, never a lost 202, and the cluster recovers by itself.
    After the restart both owner hosts are killed and a fresh one loads what PostgreSQL holds:
    what was acknowledged must be there, not only in the old owners' memory."""
    why_not = _can_restart(what)
    if why_not:
        pytest.skip(why_not)
    cluster.migrate()
    host0, host1 = cluster.owner_host(0), cluster.owner_host(1)
    front = cluster.front_end()
    products = [ids_on(shard, 2, what)[n] for shard in range(SHARDS) for n in range(2)]
    writer = Writer(front, products)
    writer.start()
    try:
        wait_owned(front, {k: (host0 if k % 2 == 0 else host1) for k in range(SHARDS)})
        time.sleep(1.0)
        for command in _restart_commands(what):
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
        acked = writer.statuses.get(202, 0)
        front.wait_for(lambda: writer.statuses.get(202, 0) > acked + 3 * len(products),
                       f"events acknowledged again after the {what} restart", 90)
        front.wait_for(lambda: front.readyz().json()["status"] == "ready",
                       f"/readyz ready again after the {what} restart", 90)
    finally:
        writer.stop()
    writer.check(front)
    if what == "broker":  # while it was away, a POST was answered 503 (or its connection failed), not 5xx
        assert set(writer.statuses) <= {0, 202, 503}, writer.statuses
        assert writer.statuses.get(503, 0) + writer.statuses.get(0, 0) > 0, writer.statuses

    # What was committed after the restart is in PostgreSQL: a fresh owner host loads it.
    for host in (host0, host1):
        host.kill()
    cluster.owner_host(0, hosts=1)
    writer.check(front)
