"""The Falcon ASGI application: routes, error handling, and what every request gets on its way
out (request id, serving worker, stats and a log line)."""

from __future__ import annotations

import hmac
import itertools
import logging
import os
import time
from importlib import resources as package_files

import falcon
import falcon.asgi
import orjson

from productd.actors.client import ShardClient
from productd.http import problems
from productd.http.catalogue import Inventory, Product, Products
from productd.http.connection import STARTED
from productd.http.feed import ChangeFeed
from productd.http.image_jobs import ImageJobRetry, ImageJobs, JobFile
from productd.http.images import Images
from productd.http.metrics import Metrics
from productd.http.problems import Problem
from productd.http.resources import Events, Health, Ready
from productd.http.stats import HttpStats

log = logging.getLogger("productd.http")

ROUTE_NAMES = {
    "/events": "events",
    "/products": "products",
    "/products/{product_id}": "product",
    "/products/{product_id}/inventory": "inventory",
    "/healthz": "healthz",
    "/readyz": "readyz",
    "/metrics": "metrics",
    "/openapi.json": "openapi",
    "/changes": "changes",
    "/images/{key}": "image",
    "/admin/image-jobs": "image_jobs",
    "/admin/image-jobs/{job_id}/retry": "image_job_retry",
}


_ids = itertools.count(1)
_id_prefix = ""


def request_id(req: falcon.Request) -> str:
    """The client's X-Request-ID if it is at most 128 printable ASCII characters, else a new one.

    New ids are a random per-process prefix and a counter: unique without a syscall per request.
    """
    global _id_prefix
    for name, value in req.scope["headers"]:  # not req.get_header: that builds a dict of them all
        if name == b"x-request-id":
            rid = value.decode("latin-1")
            if len(rid) <= 128 and rid.isascii() and rid.isprintable():
                return rid
            break
    if not _id_prefix:
        _id_prefix = os.urandom(6).hex()
    return f"{_id_prefix}-{next(_ids)}"


class RequestLog:
    """Falcon middleware: headers, stats and the log line of each request.

    It runs for every request, on the loop that serves every connection of the worker, so it does
    no more than it must (bench/README.md, "Issue 11: the ASGI front end", where the time goes).
    """

    def __init__(self, stats: HttpStats, access_log: bool) -> None:
        self.worker = str(os.getpid())
        self.stats = stats
        self.access_log = access_log

    async def process_response(self, req, resp, resource, req_succeeded) -> None:
        # The connection notes when the request's head was complete (one middleware hook less).
        now = time.perf_counter()
        elapsed = now - req.scope.get(STARTED, now)
        rid = request_id(req)
        resp.set_header("X-Request-ID", rid)
        resp.set_header("X-Productd-Worker", self.worker)
        status = resp.status_code
        self.stats.record(ROUTE_NAMES.get(req.uri_template, "other"), req.method, status, elapsed)
        if status >= 400 or self.access_log:
            fields = {
                "request_id": rid, "method": req.method, "path": req.path, "status": status,
                "duration_ms": round(elapsed * 1000, 3), "remote": req.remote_addr,
            }
            if status >= 400:
                fields["problem"] = _problem_detail(resp)
            level = logging.ERROR if status >= 500 else logging.INFO
            log.log(level, "%s %s %d", req.method, req.path, status, extra={"fields": fields})


def _problem_detail(resp: falcon.Response) -> str | None:
    if resp.data and resp.content_type == problems.PROBLEM_JSON:
        detail = str(orjson.loads(resp.data).get("detail", ""))
        return detail if len(detail) <= 500 else detail[:500] + "..."
    return None


# What every client may read whatever --auth-reads says: the service's own health and description.
OPEN_ROUTES = frozenset(("/healthz", "/readyz", "/metrics", "/openapi.json"))


class BearerAuth:
    """Falcon middleware: writes (every method but GET and HEAD), the admin routes (issue 13:
    "the admin endpoints need the token when auth is on") and, with --auth-reads, reads of the
    data (every GET but OPEN_ROUTES) need `Authorization: Bearer <token>`."""

    def __init__(self, token: str, reads_too: bool) -> None:
        self.token = token.encode()
        self.reads_too = reads_too

    async def process_resource(self, req, resp, resource, params) -> None:
        if resource is None:  # no route: the 404 (or 405) says so without asking for a token
            return
        read = req.method in ("GET", "HEAD", "OPTIONS")
        admin = req.uri_template.startswith("/admin/")
        if not read or admin or (self.reads_too and req.uri_template not in OPEN_ROUTES):
            scheme, _, given = (req.get_header("Authorization") or "").partition(" ")
            # compare_digest takes time independent of where the two tokens differ
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
                raise Problem(
                    401, "Unauthorized", "send Authorization: Bearer <token> (the token in --auth-token-file)",
                    headers={"WWW-Authenticate": 'Bearer realm="productd"'},
                )


class OpenApi:
    """The OpenAPI document kept in the package, with this instance's --max-events filled in."""

    def __init__(self, max_events: int) -> None:
        doc = orjson.loads(package_files.files("productd.http").joinpath("openapi.json").read_bytes())
        doc["components"]["schemas"]["EventBatch"]["maxItems"] = max_events
        self.document = orjson.dumps(doc)

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self.document

    on_head = on_get


def create_app(
    client: ShardClient,
    stats: HttpStats,
    *,
    max_body_bytes: int,
    max_events: int,
    access_log: bool = False,
    auth_token: str | None = None,
    auth_reads: bool = False,
    change_history: int = 100_000,
    images=None,
    pool=None,
) -> falcon.asgi.App:
    """`images` (ImageSettings) and `pool` (actors.pool.PoolBoard) come from the supervisor; without
    them (tests that build an app alone) the image routes are not there."""
    middleware: list = [RequestLog(stats, access_log)]
    if auth_token:
        middleware.append(BearerAuth(auth_token, auth_reads))
    app = falcon.asgi.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = False
    app.resp_options.default_media_type = falcon.MEDIA_JSON
    app.set_error_serializer(problems.serialize_error)
    app.add_error_handler(Exception, problems.handle_unexpected)
    app.add_route("/events", Events(client, stats, max_body_bytes, max_events))
    app.add_route("/products", Products(client, max_body_bytes))
    app.add_route("/products/{product_id}", Product(client, max_body_bytes))
    app.add_route("/products/{product_id}/inventory", Inventory(client))
    app.add_route("/healthz", Health())
    job_file = JobFile(images) if images is not None else None
    app.add_route("/readyz", Ready(client, pool, job_file))
    app.add_route("/metrics", Metrics(client, stats, pool, job_file))
    app.add_route("/openapi.json", OpenApi(max_events))
    app.add_route("/changes", ChangeFeed(client, change_history))
    if images is not None:
        from productd.images.objects import DirectoryStore

        app.add_route("/images/{key}", Images(DirectoryStore(images.images_dir)))
        app.add_route("/admin/image-jobs", ImageJobs(job_file))
        app.add_route("/admin/image-jobs/{job_id}/retry", ImageJobRetry(job_file))
    return app
