"""The WSGI ceiling, a reference row since issue 11: the do-nothing routes as a Falcon WSGI app.

It runs the way productd's front end ran before issue 11, under gthread:

    gunicorn --worker-class gthread --workers 4 --threads 2 bench.baselines.ceiling_wsgi:app

The ceiling productd is measured against is bench.baselines.ceiling (the same routes, ASGI); the
routes' work is defined there once, for both.
"""

from __future__ import annotations

import falcon

from bench.baselines.ceiling import answer_events, answer_product


class Events:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        answer_events(req, resp, req.bounded_stream.read())


class Product:
    def on_get(self, req: falcon.Request, resp: falcon.Response, product_id: str) -> None:
        answer_product(resp)


app = falcon.App()
app.add_route("/events", Events())
app.add_route("/products/{product_id}", Product())
