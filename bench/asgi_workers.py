"""The do-nothing ASGI ceiling under uvicorn's worker and under gunicorn's own `asgi` worker, alternating.

    python -m bench.asgi_workers

Issue 11 asked for both to be measured before picking one.
"""

from bench import live

s = live.gunicorn_settings()
uv = live.baseline_server("ceiling", settings={**s, "asgi_worker_class": "bench.baselines.ceiling.Worker"}).start()
ga = live.baseline_server("ceiling", settings={**s, "asgi_worker_class": "asgi"}).start()
try:
    live.preload(uv)
    live.preload(ga)
    for load in ("get", "post_single"):
        for _ in range(2):
            a = live.run_load(uv, load, seconds=3, warmup=1)
            b = live.run_load(ga, load, seconds=3, warmup=1)
            print(f"{load:12} uvicorn {a.rps:8,.0f} req/s p99 {a.p99_ms:.2f} | gunicorn asgi {b.rps:8,.0f} req/s "
                  f"p99 {b.p99_ms:.2f} non-2xx {b.non_2xx} | ratio {b.rps / a.rps:.2f}")
finally:
    uv.stop()
    ga.stop()
