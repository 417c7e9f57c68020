"""What a catalogued product costs (issue 12): shard memory and disk per product with a 40-character
name, a 500-character description and 3 image URLs, next to a bare product of the same run.

    python -m bench.memory_details      # BENCH_DETAILS_PRODUCTS (default 20,000) of each kind

A fresh `productd serve` (batch durability, its data in a temporary directory): shard VmRSS, then
the bare products (events, NDJSON), VmRSS, then as many catalogued products (POST /products from
4 threads), VmRSS; a graceful stop, then the bytes of the shard files. The change history keeps
each change's record as well (on disk and, up to --change-history per shard, in memory), so a
product written once costs its record twice until the history moves past it. Prints JSON.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile

from bench import live, memory

JSON = {"Content-Type": "application/json"}


def catalogued(i: int) -> bytes:
    return json.dumps({
        "product_id": f"d{i:011d}",
        "user_id": f"owner-{i % 500}",
        "name": f"Product {i:08d} with a forty-char name"[:40].ljust(40, "x"),
        "description": ("A description of five hundred characters. " * 13)[:500],
        "images": [f"https://img.example.com/products/{i:011d}/{k}.jpg" for k in range(3)],
        "price": 19.99,
        "stock": 5,
    }).encode()


def post_catalogued(port: int, n: int, threads: int = 4) -> None:
    def worker(k: int) -> None:
        for i in range(k, n, threads):
            status, _, body = live.request("POST", port, "/products", catalogued(i), JSON)
            if status != 201:
                raise RuntimeError(f"POST /products answered {status}: {body[:300]!r}")

    memory.in_threads(worker, threads)


def main() -> int:
    n = live.env_int("BENCH_DETAILS_PRODUCTS", 20_000)
    data_dir = tempfile.mkdtemp(prefix="bench-details-")
    server = live.productd_server(data_dir=data_dir).start()
    try:
        before, _ = memory.shard_rss(server.port)
        memory.load_products(server.port, n)
        bare, _ = memory.shard_rss(server.port)
        post_catalogued(server.port, n)
        full, _ = memory.shard_rss(server.port)
    finally:
        server.stop()
    disk = memory.disk_usage(data_dir, 2 * n)
    shutil.rmtree(data_dir, ignore_errors=True)
    print(json.dumps({
        "products_each": n,
        "bare_bytes_per_product": round((bare - before) / n, 1),
        "catalogued_bytes_per_product": round((full - bare) / n, 1),
        "disk_bytes_per_product_both_kinds": disk["disk_bytes_per_product"],
        "disk_shard_bytes": disk["disk_shard_bytes"],
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
