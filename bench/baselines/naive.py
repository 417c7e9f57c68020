"""The naive peer: the assignment done the obvious way, in one process.

A dict behind a `threading.Lock`; POST puts the parsed events on a `queue.Queue` and answers 202 at once;
a `ThreadPoolExecutor` of 4 workers takes batches off the queue and applies them under the lock; GET
reads the dict under the lock. Same JSON shapes as productd, minimal validation.

State lives in the worker process, so it is only correct with ONE gunicorn worker:

    gunicorn --workers 1 --worker-class gthread --threads 4 bench.baselines.naive:app

(Even then four appliers may apply two batches for one product out of order; events with a `version`
are still resolved by the version rule.)
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import falcon
import orjson

APPLIERS = 4

_products: dict[str, dict] = {}
_lock = threading.Lock()
_inbox: queue.Queue = queue.Queue()
_started_in: int | None = None
_start_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _apply(event: dict, now: float) -> None:
    pid = event["product_id"]
    rec = _products.get(pid)
    version = event.get("version")
    if rec is None:
        rec = _products[pid] = {"product_id": pid, "price": None, "stock": None, "version": None}
    elif version is not None and rec["version"] is not None and version <= rec["version"]:
        return  # stale
    if "price" in event:
        rec["price"] = event["price"]
    if "stock" in event:
        rec["stock"] = event["stock"]
    if version is not None:
        rec["version"] = version
    rec["updated_at"] = now


def _applier() -> None:
    while True:
        batch = _inbox.get()
        now = time.time()
        with _lock:
            for event in batch:
                _apply(event, now)


def _ensure_started() -> None:
    # Threads must start in the gunicorn worker (after fork), not in whoever imported the module.
    global _started_in, _pool
    if _started_in == os.getpid():
        return
    with _start_lock:
        if _started_in != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=APPLIERS, thread_name_prefix="applier")
            for _ in range(APPLIERS):
                _pool.submit(_applier)
            _started_in = os.getpid()


def _problem(resp: falcon.Response, status: int, detail: str) -> None:
    resp.status = status
    resp.content_type = "application/problem+json"
    title = falcon.code_to_http_status(status)[4:]
    resp.data = orjson.dumps({"title": title, "status": status, "detail": detail})


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Events:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        _ensure_started()
        body = req.bounded_stream.read()
        try:
            if (req.content_type or "").startswith("application/x-ndjson"):
                events = [orjson.loads(line) for line in body.splitlines() if line.strip()]
            else:
                doc = orjson.loads(body)
                events = doc if isinstance(doc, list) else [doc]
        except orjson.JSONDecodeError as exc:
            return _problem(resp, 400, f"malformed JSON: {exc}")
        if not events:
            return _problem(resp, 400, "no events")
        for i, ev in enumerate(events):
            if not isinstance(ev, dict) or not isinstance(ev.get("product_id"), str):
                return _problem(resp, 422, f"item {i}: product_id missing")
        _inbox.put(events)
        resp.status = falcon.HTTP_202
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps({"accepted": len(events)})


class Product:
    def on_get(self, req: falcon.Request, resp: falcon.Response, product_id: str) -> None:
        _ensure_started()
        with _lock:
            rec = _products.get(product_id)
            rec = dict(rec) if rec is not None else None
        if rec is None:
            return _problem(resp, 404, f"no product {product_id!r}")
        rec["updated_at"] = _iso(rec["updated_at"])
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps(rec)


app = falcon.App()
app.add_route("/events", Events())
app.add_route("/products/{product_id}", Product())
