"""The ceiling: productd's routes doing nothing but parse the body and answer, as a Falcon ASGI app.

Run it like productd's front end, under gunicorn's uvicorn worker with the same settings:

    gunicorn --worker-class bench.baselines.ceiling.Worker --workers 2 bench.baselines.ceiling:app

Whatever productd does on top of this (validation, routing, inbox writes, read round trips, its
connection limits) is the gap the bench reports as `productd/ceiling`.
"""

from __future__ import annotations

import falcon
import falcon.asgi
import orjson
from uvicorn_worker import UvicornWorker

_PRODUCT = orjson.dumps(
    {
        "product_id": "p00000",
        "price": 49.99,
        "stock": 100,
        "version": None,
        "updated_at": "2026-11-21T07:46:51.123456Z",
    }
)


# What the routes do, shared with bench.baselines.ceiling_wsgi: only reading the body differs.

def answer_events(req: falcon.Request, resp: falcon.Response, body: bytes) -> None:
    """Parse the body (JSON, or NDJSON line by line) and answer 202 with how many events it held."""
    if (req.content_type or "").startswith("application/x-ndjson"):
        n = sum(1 for line in body.splitlines() if line.strip() and orjson.loads(line) is not None)
    else:
        doc = orjson.loads(body)
        n = len(doc) if isinstance(doc, list) else 1
    resp.status = falcon.HTTP_202
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps({"accepted": n})


def answer_product(resp: falcon.Response) -> None:
    resp.content_type = falcon.MEDIA_JSON
    resp.data = _PRODUCT


class Worker(UvicornWorker):
    """uvicorn with the settings productd's worker (productd.http.worker) gives it, bar its protocol."""

    CONFIG_KWARGS = {
        "loop": "uvloop",
        "http": "httptools",
        "ws": "none",
        "lifespan": "off",
        "access_log": False,
        "server_header": False,
    }


class Events:
    async def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        answer_events(req, resp, await req.stream.read())


class Product:
    async def on_get(self, req: falcon.Request, resp: falcon.Response, product_id: str) -> None:
        answer_product(resp)


app = falcon.asgi.App()
app.add_route("/events", Events())
app.add_route("/products/{product_id}", Product())
