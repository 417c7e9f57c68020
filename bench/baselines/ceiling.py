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
        body = await req.stream.read()
        if (req.content_type or "").startswith("application/x-ndjson"):
            n = sum(1 for line in body.splitlines() if line.strip() and orjson.loads(line) is not None)
        else:
            doc = orjson.loads(body)
            n = len(doc) if isinstance(doc, list) else 1
        resp.status = falcon.HTTP_202
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps({"accepted": n})


class Product:
    async def on_get(self, req: falcon.Request, resp: falcon.Response, product_id: str) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = _PRODUCT


app = falcon.asgi.App()
app.add_route("/events", Events())
app.add_route("/products/{product_id}", Product())
