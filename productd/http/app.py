"""The Falcon application: routes, error handling and the headers every response carries."""

from __future__ import annotations

import os
import uuid

import falcon

from productd.actors.client import ShardClient
from productd.http import problems
from productd.http.metrics import Metrics
from productd.http.resources import Events, Health, ProductResource, Ready


class ResponseHeaders:
    """X-Request-ID (the client's if it is sane, else a new one) and the serving worker's pid."""

    def __init__(self) -> None:
        self.worker = str(os.getpid())

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        rid = req.get_header("X-Request-ID")
        if not rid or len(rid) > 128 or not rid.isascii() or not rid.isprintable():
            rid = uuid.uuid4().hex
        resp.set_header("X-Request-ID", rid)
        resp.set_header("X-Productd-Worker", self.worker)


def create_app(client: ShardClient, *, max_body_bytes: int, max_events: int) -> falcon.App:
    app = falcon.App(middleware=[ResponseHeaders()])
    app.req_options.strip_url_path_trailing_slash = False
    app.resp_options.default_media_type = falcon.MEDIA_JSON
    app.set_error_serializer(problems.serialize_error)
    app.add_error_handler(Exception, problems.handle_unexpected)
    app.add_route("/events", Events(client, max_body_bytes, max_events))
    app.add_route("/products/{product_id}", ProductResource(client))
    app.add_route("/healthz", Health())
    app.add_route("/readyz", Ready(client))
    app.add_route("/metrics", Metrics(client))
    return app
