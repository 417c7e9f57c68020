"""The catalogue's resources: one product (read, replace, merge-patch, delete), the collection
(create, multi-get; the listing is productd.http.listing) and a product's inventory.

Every write goes to the product's owning shard as one Write message, behind everything already
in its inbox; the shard checks the write's conditions against the state it lands on
(productd.store.catalogue) and answers with the outcome, which is mapped to a status here.
"""

from __future__ import annotations

import contextlib

import falcon
import orjson

from productd.actors.client import InboxFull, ShardClient, ShardTimeout, ShardUnavailable
from productd.http import listing, product_input
from productd.http.problems import Problem
from productd.http.render import etag, product_json
from productd.http.resources import read_body
from productd.http.validation import PRODUCT_ID_RULE, parse_json, valid_product_id
from productd.store import catalogue
from productd.store.record import revision, unpack

MAX_IDS = 1000  # ids one multi-get takes
JSON = ("application/json",)
MERGE_PATCH = ("application/merge-patch+json", "application/json")


@contextlib.contextmanager
def shard_errors(client: ShardClient):
    """What a shard's trouble means to the client: 503 to retry, or 504 when the outcome is unknown."""
    try:
        yield
    except InboxFull as exc:
        raise Problem(503, "Inbox full", f"the inbox of shard {exc.args[0]} is full; nothing was changed",
                      kind="inbox-full", headers={"Retry-After": "1"}) from None
    except ShardUnavailable as exc:
        raise Problem(503, "Shard unavailable",
                      f"shard {exc.args[0]} is restarting, stopping or cannot commit to disk; nothing was changed",
                      headers={"Retry-After": "1"}) from None
    except ShardTimeout as exc:
        raise Problem(504, "Shard timeout",
                      f"shard {exc.args[0]} did not answer within {client.read_timeout}s (--read-timeout); "
                      "a write may or may not have been applied: read the product, or retry with If-Match") from None


def check_id(product_id: str) -> None:
    if not valid_product_id(product_id):
        raise Problem(400, "Invalid product id", f"a product id is {PRODUCT_ID_RULE}", kind="invalid-product-id")


def if_match(value: str | None) -> str | tuple | None:
    """An If-Match header as the shard checks it: "*", or the revisions of its strong ETags."""
    if value is None:
        return None
    value = value.strip()
    if value == "*":
        return catalogue.ANY
    revisions = []
    for tag in value.split(","):
        tag = tag.strip()  # a weak tag (W/"...") never matches: If-Match compares strongly
        if len(tag) > 2 and tag[0] == tag[-1] == '"' and tag[1:-1].isdigit():
            revisions.append(int(tag[1:-1]))
    return tuple(revisions)


def none_match_matches(value: str, packed: bytes) -> bool:
    """Does If-None-Match on a read name this state (weak comparison)?"""
    if value.strip() == "*":
        return True
    current = etag(revision(packed))
    return any(tag.strip().removeprefix("W/") == current for tag in value.split(","))


async def read_json(req: falcon.Request, limit: int, types: tuple[str, ...]) -> object:
    media, _, params = (req.content_type or "").partition(";")
    media = media.strip().lower()
    for param in params.split(";"):
        key, _, value = param.partition("=")
        charset = value.strip().strip('"').lower()
        if key.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            raise Problem(415, "Unsupported charset", f"charset {charset!r} is not supported; send UTF-8")
    if media not in types:
        shown = f"Content-Type {media!r}" if media else "no Content-Type"
        raise Problem(415, "Unsupported media type", f"{shown}; send {' or '.join(types)}",
                      headers={"Accept-Patch" if types is MERGE_PATCH else "Accept": ", ".join(types)})
    return parse_json(await read_body(req, limit))


def answer(resp: falcon.Response, product_id: str, outcome: int, value: object) -> None:
    """Map a shard's write outcome to the response."""
    if outcome in (catalogue.OK, catalogue.CREATED):
        if value is None:  # deleted
            resp.status = falcon.HTTP_204
            return
        resp.status = falcon.HTTP_201 if outcome == catalogue.CREATED else falcon.HTTP_200
        if outcome == catalogue.CREATED:
            resp.location = f"/products/{product_id}"
        resp.set_header("ETag", etag(revision(value)))
        resp.data = orjson.dumps(product_json(product_id, value))
        return
    if outcome == catalogue.NOT_FOUND:
        raise Problem(404, "Unknown product", f"there is no product {product_id!r}")
    if outcome == catalogue.EXISTS:
        raise Problem(409, "Product exists", f"product {product_id!r} exists already; PUT or PATCH changes it",
                      kind="product-exists", etag=etag(value))
    if outcome == catalogue.PRECONDITION_FAILED:
        now = "no product" if value is None else f"its ETag is {etag(value)}"
        raise Problem(412, "Precondition failed",
                      f"the condition does not hold for product {product_id!r} ({now}); nothing was changed",
                      kind="precondition-failed", etag=None if value is None else etag(value))
    if outcome == catalogue.STALE:
        raise Problem(409, "Stale version",
                      f"the write's version is not above the stored version {value}; nothing was changed",
                      kind="stale-version", stored_version=value)
    if outcome == catalogue.INVALID:
        raise Problem(422, "Invalid product", str(value), kind="invalid-product")
    raise Problem(503, "Not committed",  # FAILED: sync durability, the commit failed
                  f"the write is applied but could not be committed ({value}); it is committed when the disk "
                  "recovers, unless the shard stops first: read the product before retrying",
                  headers={"Retry-After": "1"})


async def _read_one(client: ShardClient, product_id: str) -> bytes:
    check_id(product_id)
    try:  # not `with shard_errors(...)`: the context manager costs a GET 0.8 us
        packed = await client.read(product_id)
    except (ShardUnavailable, ShardTimeout):
        with shard_errors(client):
            raise
    if packed is None:
        raise Problem(404, "Unknown product", f"there is no product {product_id!r}")
    return packed


class Product:
    """/products/{product_id}"""

    def __init__(self, client: ShardClient, max_body_bytes: int) -> None:
        self.client = client
        self.max_body_bytes = max_body_bytes

    async def on_get(self, req: falcon.Request, resp: falcon.Response, product_id: str) -> None:
        packed = await _read_one(self.client, product_id)
        resp.set_header("ETag", etag(revision(packed)))
        # Straight from the scope: req.get_header builds a dict of every header, on the hottest path.
        for name, value in req.scope["headers"]:
            if name == b"if-none-match" and none_match_matches(value.decode("latin-1"), packed):
                resp.status = falcon.HTTP_304
                return
        resp.data = orjson.dumps(product_json(product_id, packed))

    on_head = on_get

    async def on_put(self, req: falcon.Request, resp: falcon.Response, product_id: str) -> None:
        check_id(product_id)
        doc = await read_json(req, self.max_body_bytes, JSON)
        fields = product_input.product_fields(doc, product_input.PUT, product_id)
        await self._write(req, resp, product_id, catalogue.PUT, fields)

    async def on_patch(self, req: falcon.Request, resp: falcon.Response, product_id: str) -> None:
        check_id(product_id)
        doc = await read_json(req, self.max_body_bytes, MERGE_PATCH)
        fields = product_input.product_fields(doc, product_input.PATCH, product_id)
        await self._write(req, resp, product_id, catalogue.PATCH, fields)

    async def on_delete(self, req: falcon.Request, resp: falcon.Response, product_id: str) -> None:
        check_id(product_id)
        await self._write(req, resp, product_id, catalogue.DELETE, None)

    async def _write(self, req, resp, product_id: str, op: int, fields: dict | None) -> None:
        fields = {k: v for k, v in (fields or {}).items() if k != "product_id"} if fields is not None else None
        inm = req.get_header("If-None-Match")
        if inm is not None and inm.strip() != "*":
            raise Problem(400, "Unsupported If-None-Match",
                          "a write takes If-None-Match: * (create only) and nothing else; use If-Match for ETags")
        with shard_errors(self.client):
            outcome, value = await self.client.write(
                product_id, op, fields, if_match(req.get_header("If-Match")), catalogue.ANY if inm else None
            )
        answer(resp, product_id, outcome, value)


class Inventory:
    """/products/{product_id}/inventory: stock now. Reservations come with orders; until then
    `reserved` is 0 and `available` is the stock."""

    def __init__(self, client: ShardClient) -> None:
        self.client = client

    async def on_get(self, req: falcon.Request, resp: falcon.Response, product_id: str) -> None:
        packed = await _read_one(self.client, product_id)
        p = unpack(packed)
        resp.set_header("ETag", etag(p.revision))
        resp.data = orjson.dumps({
            "product_id": product_id,
            "stock": p.stock,
            "reserved": 0,
            "available": p.stock,
            "updated_at": product_json(product_id, packed)["updated_at"],
        })

    on_head = on_get


class Products:
    """/products: POST creates; GET with `ids` is a multi-get, without it the listing."""

    def __init__(self, client: ShardClient, max_body_bytes: int) -> None:
        self.client = client
        self.max_body_bytes = max_body_bytes

    async def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        doc = await read_json(req, self.max_body_bytes, JSON)
        fields = product_input.product_fields(doc, product_input.CREATE)
        product_id = fields.pop("product_id", None) or product_input.new_product_id()
        with shard_errors(self.client):
            outcome, value = await self.client.write(product_id, catalogue.CREATE, fields)
        answer(resp, product_id, outcome, value)

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if "ids" not in req.params:
            await listing.list_products(self.client, req, resp)
            return
        others = sorted(set(req.params) - {"ids"})
        if others:
            raise Problem(400, "Bad query", f"ids takes no other parameters (got {', '.join(others)})")
        ids = multi_get_ids(req.params["ids"])
        with shard_errors(self.client):
            found = await self.client.read_many(ids)
        products, not_found = [], []
        for product_id in ids:
            packed = found[product_id]
            if packed is None:
                not_found.append(product_id)
            else:
                products.append(product_json(product_id, packed))
        resp.data = orjson.dumps({"products": products, "not_found": not_found})

    on_head = on_get


def multi_get_ids(raw: object) -> list[str]:
    if type(raw) is list:  # ids=a&ids=b
        raw = ",".join(raw)
    items = raw.split(",") if raw else []
    if not items:
        raise Problem(400, "Bad query", "ids is empty; give product ids separated by commas")
    if len(items) > MAX_IDS:
        raise Problem(400, "Too many ids", f"{len(items)} ids; a multi-get takes at most {MAX_IDS}",
                      kind="too-many-ids")
    bad = [item for item in items if not valid_product_id(item)]
    if bad:
        raise Problem(400, "Invalid product id",
                      f"{len(bad)} id(s) are not product ids (each is {PRODUCT_ID_RULE}): {bad[:5]!r}",
                      kind="invalid-product-id")
    return list(dict.fromkeys(items))  # each id once, in the order first asked
