"""Quick A/B of productd against the ceiling: alternating runs, the ratio of each pair, their median.

    python -m bench.compare ROUNDS LOAD[,LOAD...] [productd serve arguments...]
    BENCH_WORKERS=4 BENCH_THREADS=2 python -m bench.compare 3 get,post_single --shards 2

Both servers run with the same gunicorn settings (bench.live.gunicorn_settings). Each round runs
the ceiling, then productd, back to back (1 s warm-up + BENCH_SECONDS, default 4 here), so slow
drifts of the shared machine fall on both. Used to choose the defaults and to try one change at a
time; the full table comes from `tox -e bench`.
"""

from __future__ import annotations

import os
import statistics
import sys

from bench import live


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    rounds, loads, extra = int(argv[0]), argv[1].split(","), argv[2:]
    seconds = live.env_float("BENCH_SECONDS", 4.0)
    ceiling = live.baseline_server("ceiling").start()
    try:
        live.preload(ceiling)
        productd = live.productd_server(extra=extra).start()
        try:
            live.preload(productd)
            for load in loads:
                ratios = []
                for _ in range(rounds):
                    a = live.run_load(ceiling, load, seconds=seconds, warmup=1)
                    b = live.run_load(productd, load, seconds=seconds, warmup=1)
                    ratios.append(b.rps / a.rps)
                    print(f"{load:12} [{b.tool}] ceiling {a.rps:8,.0f} req/s p99 {a.p99_ms:6.2f} ms | productd "
                          f"{b.rps:8,.0f} req/s p99 {b.p99_ms:6.2f} ms non-2xx {b.non_2xx} | ratio {ratios[-1]:.3f}",
                          flush=True)
                print(f"{load:12} median ratio {statistics.median(ratios):.3f} over {rounds} rounds; "
                      f"{live.gunicorn_settings()} {' '.join(extra)}", flush=True)
        finally:
            productd.stop()
    finally:
        ceiling.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("BENCH_SECONDS", "4")
    sys.exit(main(sys.argv[1:]))
