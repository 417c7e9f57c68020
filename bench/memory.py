"""Memory per product, shard restart time and start-up time with 1 million products.

    python -m bench.memory            # prints JSON; BENCH_MEMORY_PRODUCTS=200000 for a quicker run

1. Start a fresh `productd serve` (default durability, data in a temporary directory).
2. Sum VmRSS (/proc/<pid>/status) of the shard pids that /readyz lists.
3. POST 1,000,000 events for distinct products with 12-character ids, as NDJSON through HTTP
   (10,000 per request), and wait until /readyz counts them all in the shards.
4. Sum VmRSS again: (after - before) / products = resident bytes per product in the shards.
5. kill -9 one shard and time until GET of one of its products answers 200 again
   (and until it answers at all without a 5xx).
   With batch durability the killed shard loses what it applied since its last commit
   (`products_lost_by_kill`); memory-only mode loses the shard's products (404 after restart).
6. Stop the service gracefully and start it again on the same data directory: time until /readyz
   is 200 with every product loaded (the durable start-up time).
7. Stop it gracefully again (SIGTERM: each shard commits and folds its WAL into its file on a clean
   stop) and sum the sizes of the shard files (`shard-*.sqlite3` plus any `-wal`/`-shm` left):
   bytes on disk / products = bytes per product on disk.

`run_once()` caches the result per product count, so test_memory.py and test_durability.py share one
1M-product run in a session.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time

from bench import live
from productd.actors.routing import shard_for

CHUNK = 10_000  # events per request: productd's default --max-events


def products() -> int:
    return live.env_int("BENCH_MEMORY_PRODUCTS", 1_000_000)


def memory_id(i: int) -> str:
    return f"m{i:011d}"  # 12 characters


def readyz(port: int) -> dict:
    status, _, body = live.request("GET", port, "/readyz")
    doc = json.loads(body)
    doc["http_status"] = status
    return doc


def shard_rss(port: int) -> tuple[int, list[int]]:
    pids = [s["pid"] for s in readyz(port)["shards"]]
    return sum(live.service.rss_bytes(p) for p in pids), pids


def shard_products(port: int) -> int:
    return sum(s.get("products", 0) for s in readyz(port)["shards"])


def in_threads(work, threads: int) -> None:
    """Run work(k) for k in 0..threads-1, each in a thread of its own; raise the first error."""
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            work(k)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise errors[0]


def load_products(port: int, n: int, threads: int = 2) -> float:
    """POST n distinct products as NDJSON; returns seconds until all are counted by the shards."""
    started = time.monotonic()
    chunks = list(range(0, n, CHUNK))

    def worker(k: int) -> None:
        for start in chunks[k::threads]:
            ids = [memory_id(i) for i in range(start, min(n, start + CHUNK))]
            live.post_ndjson(port, ids, chunk=CHUNK, seed=start)

    in_threads(worker, threads)
    deadline = time.monotonic() + 300
    while shard_products(port) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"shards hold {shard_products(port)} of {n} products after 300s")
        time.sleep(0.1)
    return time.monotonic() - started


def owned_product(shard: int, shards: int, n: int) -> str:
    return next(memory_id(i) for i in range(n) if shard_for(memory_id(i), shards) == shard)


def restart_after_kill(port: int, product: str, pid: int, timeout: float = 120.0) -> dict:
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    first_answer = first_200 = None
    last = None
    while time.monotonic() - t0 < timeout:
        try:
            last, _, _ = live.request("GET", port, f"/products/{product}", timeout=5)
        except OSError:
            last = None
        now = time.monotonic() - t0
        if last is not None and last < 500 and first_answer is None:
            first_answer = now
        if last == 200:
            first_200 = now
            break
        if last == 404:  # memory-only mode: the shard serves again but lost its state
            break
        time.sleep(0.005)
    return {
        "restart_seconds": first_200,
        "restart_first_non_5xx_seconds": first_answer,
        "restart_last_status": last,
    }


def disk_usage(data_dir: str, products: int) -> dict:
    """Sizes of the shard files under data_dir, and bytes per product on disk (call it after a graceful stop)."""
    files = sorted(glob.glob(os.path.join(data_dir, "**", "shard-*.sqlite3*"), recursive=True))
    main = [f for f in files if f.endswith(".sqlite3")]
    sizes = {f: os.path.getsize(f) for f in files}
    total = sum(sizes.values())
    rows = 0
    for f in main:  # after sizing: immutable=1 creates no -shm/-wal and takes no lock
        db = sqlite3.connect(f"file:{f}?mode=ro&immutable=1", uri=True)
        try:
            rows += db.execute("SELECT count(*) FROM products").fetchone()[0]
        finally:
            db.close()
    return {
        "disk_shard_files": len(main),
        "disk_shard_bytes": total,
        "disk_wal_shm_bytes": total - sum(sizes[f] for f in main),  # 0 when every shard stopped cleanly
        "disk_products": rows,
        "disk_bytes_per_product": total / products if products else None,
    }


def run(n: int | None = None, log=print) -> dict:
    n = n or products()
    data_dir = tempfile.mkdtemp(prefix="bench-memory-")
    out: dict = {"products": n, "id_length": len(memory_id(0))}
    try:
        server = live.productd_server(data_dir=data_dir).start()
        try:
            port = server.port
            out["durability"] = live.durability_of(server)
            before, pids = shard_rss(port)
            log(f"shards {pids}: {before / 2**20:.1f} MiB RSS before; loading {n:,} products ...")
            out["load_seconds"] = load_seconds = load_products(port, n)
            out["load_events_per_s"] = n / load_seconds
            after, pids_after = shard_rss(port)
            if pids_after != pids:
                raise RuntimeError(f"a shard restarted while loading: {pids} -> {pids_after}")
            out.update(
                shards=len(pids),
                rss_before_bytes=before,
                rss_after_bytes=after,
                bytes_per_product=(after - before) / n,
            )
            log(f"{after / 2**20:.1f} MiB after: {(after - before) / n:.1f} bytes/product; killing shard 0")
            product = owned_product(0, len(pids), n)
            out.update(restart_after_kill(port, product, pids[0]))
            out["restart_product"] = product
            log(f"shard 0 back: {out}")
            # wait until the restarted shard is ready again, so that the stop below drains cleanly
            live.service.wait_ready(port, server.proc, 120, log_tail=server.log_tail)
            expected = shard_products(port)
        finally:
            server.stop()
        out["products_after_restart"] = expected
        out["products_lost_by_kill"] = n - expected  # batch durability: changes since the last commit
        t0 = time.monotonic()
        again = live.productd_server(data_dir=data_dir).start(timeout=600)
        try:
            out["startup_seconds"] = time.monotonic() - t0
            out["products_after_startup"] = shard_products(again.port)
            status, _, _ = live.request("GET", again.port, f"/products/{memory_id(n - 1)}")
            out["startup_last_product_status"] = status
        finally:
            out["final_stop_exit_code"] = again.stop()  # graceful (SIGTERM) unless it had to be killed
        out.update(disk_usage(data_dir, out["products_after_startup"]))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    log(json.dumps(out, indent=2))
    return out


_runs: dict[int, dict] = {}


def has_run(n: int | None = None) -> bool:
    """Whether run_once(n) would reuse an earlier run."""
    return (n or products()) in _runs


def run_once(n: int | None = None, log=print) -> dict:
    """run(n), or the result of the run(n) made earlier in this process."""
    n = n or products()
    if n not in _runs:
        _runs[n] = run(n, log)
    return dict(_runs[n])


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else None)
