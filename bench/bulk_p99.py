"""GET p99 alone and while 2 clients post 10,000-event NDJSON bodies to the same workers (issue 11).

    python -m bench.bulk_p99 [productd serve arguments...]

One loop serves every connection of a worker, so CPU spent on a big body stalls them all.
"""

import http.client
import sys
import threading

from bench import live

srv = live.productd_server(extra=sys.argv[1:]).start()
try:
    live.preload(srv)
    body = live.ndjson_events([live.product_id(i % live.N_PRODUCTS) for i in range(10_000)])
    alone = live.run_load(srv, "get", seconds=4, warmup=1)
    stop = threading.Event()
    posted = [0]

    def poster():
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        while not stop.is_set():
            conn.request("POST", "/events", body=body, headers={"Content-Type": "application/x-ndjson"})
            conn.getresponse().read()
            posted[0] += 1

    ts = [threading.Thread(target=poster) for _ in range(2)]
    for t in ts:
        t.start()
    busy = live.run_load(srv, "get", seconds=4, warmup=1)
    stop.set()
    for t in ts:
        t.join()
    print(f"{' '.join(sys.argv[1:]) or 'default'}: GET alone {alone.rps:,.0f} req/s p99 {alone.p99_ms:.2f} ms | "
          f"with bulk posts {busy.rps:,.0f} req/s p99 {busy.p99_ms:.2f} ms ({posted[0]} bulk posts of 10,000)")
finally:
    srv.stop()
