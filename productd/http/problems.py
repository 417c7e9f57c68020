"""Problem responses (RFC 9457): every error productd sends is application/problem+json."""

from __future__ import annotations

import logging

import falcon
import orjson

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:productd:problem:"

log = logging.getLogger("productd.http")

# A type for each status we send; `Problem` may name a finer one.
_TYPES = {
    400: "malformed-request",
    401: "unauthorized",
    404: "not-found",
    405: "method-not-allowed",
    408: "request-timeout",
    413: "too-large",
    414: "target-too-long",
    415: "unsupported-media-type",
    422: "invalid-events",
    431: "head-too-large",
    500: "internal-error",
    503: "unavailable",
    504: "shard-timeout",
}


class Problem(falcon.HTTPError):
    """An HTTP error with a problem type and extra members (errors, accepted, ...)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: object,
    ) -> None:
        super().__init__(falcon.code_to_http_status(status), title=title, description=detail, headers=headers)
        self.kind = kind
        self.extra = extra


def problem_body(status: int, title: str, detail: str | None, kind: str | None = None, **extra) -> dict:
    body = {
        "type": TYPE_PREFIX + (kind or _TYPES.get(status, "error")),
        "title": title,
        "status": status,
        "detail": detail or title,
    }
    body.update(extra)
    return body


def serialize_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    """Falcon's error serializer: the same problem document whatever the client accepts."""
    status = exc.status_code
    if isinstance(exc, Problem):
        body = problem_body(status, exc.title, exc.description, exc.kind, **exc.extra)
    else:
        body = problem_body(status, exc.title or "Error", exc.description or _default_detail(req, status))
    resp.content_type = PROBLEM_JSON
    resp.data = orjson.dumps(body)


def _default_detail(req: falcon.Request, status: int) -> str:
    if status == 404:
        return f"no resource at {req.path}"
    if status == 405:
        return f"{req.method} is not allowed on {req.path}"
    return falcon.code_to_http_status(status)


async def handle_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params: dict, ws=None) -> None:
    """A bug, not bad input: log it with the request, answer a problem rather than a bare 500."""
    log.exception("unhandled error on %s %s", req.method, req.path)
    resp.status = falcon.HTTP_500
    resp.content_type = PROBLEM_JSON
    resp.data = orjson.dumps(
        problem_body(500, "Internal error", "the server failed on this request; it has been logged")
    )
