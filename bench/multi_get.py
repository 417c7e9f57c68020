"""Multi-get against single-id GET (issue 12): products read per second, side by side in one run.

    python -m bench.multi_get        # BENCH_SECONDS (default 5) per load; wrk if installed

One `productd serve` (the bench's productd settings, 10,000 preloaded products), then the `get`
load (one id per request) and the multi-get load (`GET /products?ids=` with 100 random ids per
request) at the same connections. Target: products/s of the multi-get at least 8 times the
single-id GET's requests/s. Prints JSON.
"""

from __future__ import annotations

import json
import sys

from bench import live

IDS = 100
GET_MANY = live.Load("get_many", "get_many.lua", 0, description=f"GET /products?ids= {IDS} random ids", batch=IDS)


def main() -> int:
    server = live.productd_server().start()
    try:
        live.preload(server)
        single = live.run_load(server, "get")
        many = live.run_load(server, GET_MANY)
    finally:
        server.stop()
    result = {
        "single_get_rps": round(single.rps),
        "single_get_p99_ms": single.p99_ms,
        "multi_get_rps": round(many.rps),
        "multi_get_products_per_s": round(many.rps * IDS),
        "multi_get_p99_ms": many.p99_ms,
        "non_2xx": single.non_2xx + many.non_2xx,
        "ratio": round(many.rps * IDS / single.rps, 2) if single.rps else None,
        "target_ratio": 8,
        "tool": many.tool,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
