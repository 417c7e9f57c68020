"""The WSGI ceiling, a reference row since issue 11: the do-nothing routes as a Falcon WSGI app.

It runs the way productd's front end ran before issue 11, under gthread:

    gunicorn --worker-class gthread --workers 4 --threads 2 bench.baselines.ceiling_wsgi:app

The ceiling productd is measured against is bench.baselines.ceiling (the same routes, ASGI).
"""

from __future__ import annotations

import falcon
import orjson

_PRODUCT = orjson.dumps(
    {
        "product_id": "p00000",
        "price": 49.99,
        "stock": 100,
        "version": None,
        "updated_at": "2026-11-21T07:46:51.123456Z",
    }
)


class Events:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = req.bounded_stream.read()
        if (req.content_type or "").startswith("application/x-ndjson"):
            n = sum(1 for line in body.splitlines() if line.strip() and orjson.loads(line) is not None)
        else:
            doc = orjson.loads(body)
            n = len(doc) if isinstance(doc, list) else 1
        resp.status = falcon.HTTP_202
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps({"accepted": n})


class Product:
    def on_get(self, req: falcon.Request, resp: falcon.Response, product_id: str) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = _PRODUCT


app = falcon.App()
app.add_route("/events", Events())
app.add_route("/products/{product_id}", Product())
