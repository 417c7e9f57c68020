"""The catalogue API (issue 12, /work/spec-catalogue.md) against a real productd: create, read,
replace, merge-patch and delete products; conditional requests (ETag, If-Match, If-None-Match)
checked by the owning shard, with the If-Match race; multi-get; inventory; every field rule; auth;
durability across restarts; a product too big for one inbox frame.

Bad input comes first: every rule of the spec is a 4xx problem naming the field, and the service
answers afterwards.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import string
import threading
import time

import pytest
import requests
from service import TIMEOUT, assert_problem, pointers, raw_request, uid

DOC_KEYS = {
    "product_id", "user_id", "name", "description", "images", "price", "stock", "version",
    "created_at", "updated_at", "etag",
}  # fmt: skip
INVENTORY_KEYS = {"product_id", "stock", "reserved", "available", "updated_at"}
ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
ETAG = re.compile(r'^"[0-9]+"$')
MERGE_PATCH = "application/merge-patch+json"
MAX_IDS = 1000
RACERS = 20
JOIN_DEADLINE = 60.0  # only so that a wedged client thread fails the test
EMOJI = "\U0001f600"  # 4 bytes in UTF-8


# ---------------------------------------------------------------- helpers


def create(svc, body, headers=None) -> requests.Response:
    return requests.post(svc.url + "/products", json=body, headers=headers, timeout=TIMEOUT)


def put(svc, pid: str, body, headers=None) -> requests.Response:
    return requests.put(f"{svc.url}/products/{pid}", json=body, headers=headers, timeout=TIMEOUT)


def patch(svc, pid: str, body, headers=None, content_type: str = MERGE_PATCH, session=None) -> requests.Response:
    hdrs = {"Content-Type": content_type, **(headers or {})}
    return (session or requests).patch(f"{svc.url}/products/{pid}", data=json.dumps(body).encode(),
                                       headers=hdrs, timeout=TIMEOUT)


def delete(svc, pid: str, headers=None) -> requests.Response:
    return requests.delete(f"{svc.url}/products/{pid}", headers=headers, timeout=TIMEOUT)


def get(svc, pid: str, headers=None) -> requests.Response:
    return requests.get(f"{svc.url}/products/{pid}", headers=headers, timeout=TIMEOUT)


def multi_get(svc, ids, headers=None) -> requests.Response:
    # Literal commas, as the spec writes the query (requests' params= would send %2C).
    return requests.get(f"{svc.url}/products?ids={','.join(ids)}", headers=headers, timeout=TIMEOUT)


def inventory(svc, pid: str, headers=None) -> requests.Response:
    return requests.get(f"{svc.url}/products/{pid}/inventory", headers=headers, timeout=TIMEOUT)


def as_input(doc: dict, keys) -> dict:
    """The fields `keys` of a product document as a write takes them: `images` is shown per image
    (url, state, ...) but written as a list of URLs."""
    return {k: urls(doc) if k == "images" else doc[k] for k in keys}


def urls(doc: dict) -> list[str]:
    """The image URLs of a product document; each image there is an object (docs/images.md)."""
    assert all(set(image) >= {"url", "state"} for image in doc["images"]), doc["images"]
    return [image["url"] for image in doc["images"]]


def product_body(pid: str | None = None, **fields) -> dict:
    body = {"user_id": "owner-1", "name": "Blue mug", **fields}
    if pid is not None:
        body["product_id"] = pid
    return body


def created(svc, pid: str | None = None, **fields) -> dict:
    """POST /products that must succeed: the document."""
    r = create(svc, product_body(pid, **fields))
    assert r.status_code == 201, f"{r.status_code} {r.text}"
    return r.json()


def current(svc, pid: str) -> dict:
    r = get(svc, pid)
    assert r.status_code == 200, f"GET {pid}: {r.status_code} {r.text}"
    return r.json()


def assert_document(r: requests.Response, status: int = 200) -> dict:
    """A product answer: status, JSON, every key, ETag header equal to the body's etag."""
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:500]}"
    assert r.headers["Content-Type"].split(";")[0] == "application/json", r.headers
    doc = r.json()
    assert set(doc) == DOC_KEYS, sorted(doc)
    assert ETAG.match(doc["etag"]), doc["etag"]
    assert r.headers.get("ETag") == doc["etag"], (r.headers.get("ETag"), doc["etag"])
    assert doc["created_at"] <= doc["updated_at"], doc
    return doc


def assert_kind(body: dict, kind: str) -> None:
    assert body["type"] == f"urn:productd:problem:{kind}", body


def assert_answering(svc) -> None:
    r = requests.get(svc.url + "/healthz", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    pid = uid("alive")
    assert create(svc, product_body(pid)).status_code == 201
    assert get(svc, pid).status_code == 200


def short_prefix() -> str:
    return "".join(random.choices(string.ascii_lowercase, k=2))


# ---------------------------------------------------------------- bad input first

LONG_URL = "https://example.com/" + "a" * (2049 - len("https://example.com/"))  # 2049 characters
OK_URL = "https://example.com/" + "b" * (2048 - len("https://example.com/"))  # 2048 characters
BAD_FIELDS = [
    # (label, field, value, pointer prefix)
    ("pid-empty", "product_id", "", "/product_id"),
    ("pid-long", "product_id", "p" * 129, "/product_id"),
    ("pid-space", "product_id", "a b", "/product_id"),
    ("pid-slash", "product_id", "a/b", "/product_id"),
    ("pid-dot", "product_id", ".", "/product_id"),
    ("pid-dotdot", "product_id", "..", "/product_id"),
    ("pid-newline", "product_id", "abc\n", "/product_id"),
    ("pid-int", "product_id", 5, "/product_id"),
    ("user-empty", "user_id", "", "/user_id"),
    ("user-long", "user_id", "u" * 129, "/user_id"),
    ("user-bad-char", "user_id", "ow ner", "/user_id"),
    ("user-int", "user_id", 7, "/user_id"),
    ("user-dot", "user_id", ".", "/user_id"),
    ("user-null", "user_id", None, "/user_id"),
    ("name-empty", "name", "", "/name"),
    ("name-long", "name", "n" * 201, "/name"),
    ("name-long-4byte", "name", EMOJI * 201, "/name"),
    ("name-newline", "name", "Blue\nmug", "/name"),
    ("name-nul", "name", "Blue\x00mug", "/name"),
    ("name-tab", "name", "Blue\tmug", "/name"),
    ("name-del", "name", "Blue\x7fmug", "/name"),
    ("name-int", "name", 12, "/name"),
    ("name-list", "name", ["Blue"], "/name"),
    ("name-null", "name", None, "/name"),
    ("desc-long", "description", "d" * 5001, "/description"),
    ("desc-long-4byte", "description", EMOJI * 5001, "/description"),
    ("desc-int", "description", 3, "/description"),
    ("desc-object", "description", {"text": "x"}, "/description"),
    ("images-string", "images", "https://example.com/a.png", "/images"),
    ("images-object", "images", {"0": "https://example.com/a.png"}, "/images"),
    ("images-eleven", "images", [f"https://example.com/{i}.png" for i in range(11)], "/images"),
    ("images-duplicate", "images", ["https://example.com/a.png", "https://example.com/a.png"], "/images"),
    ("images-relative", "images", ["/img/a.png"], "/images/0"),
    ("images-relative-bare", "images", ["a.png"], "/images/0"),
    ("images-scheme-relative", "images", ["//example.com/a.png"], "/images/0"),
    ("images-ftp", "images", ["ftp://example.com/a.png"], "/images/0"),
    ("images-javascript", "images", ["javascript:alert(1)"], "/images/0"),
    ("images-data", "images", ["data:image/png;base64,AAAA"], "/images/0"),
    ("images-no-host", "images", ["http://"], "/images/0"),
    ("images-empty-string", "images", [""], "/images/0"),
    ("images-space", "images", ["https://exa mple.com/a.png"], "/images/0"),
    ("images-too-long", "images", [LONG_URL], "/images/0"),
    ("images-second-bad", "images", ["https://example.com/a.png", "mailto:a@b.c"], "/images/1"),
    ("images-int", "images", [5], "/images/0"),
    ("images-null-item", "images", [None], "/images/0"),
    ("price-negative", "price", -1, "/price"),
    ("price-string", "price", "5", "/price"),
    ("price-bool", "price", True, "/price"),
    ("stock-negative", "stock", -1, "/stock"),
    ("stock-fraction", "stock", 1.5, "/stock"),
    ("stock-bool", "stock", True, "/stock"),
    ("stock-huge", "stock", 2**63, "/stock"),
    ("stock-string", "stock", "3", "/stock"),
    ("version-negative", "version", -1, "/version"),
    ("version-huge", "version", 2**63, "/version"),
    ("version-bool", "version", False, "/version"),
    ("version-string", "version", "2", "/version"),
]


@pytest.mark.parametrize(("field", "value", "pointer"), [b[1:] for b in BAD_FIELDS], ids=[b[0] for b in BAD_FIELDS])
def test_create_refuses_each_bad_field(service, field, value, pointer):
    pid = uid("bad")
    body = product_body(pid)
    body[field] = value
    r = create(service, body)
    problem = assert_problem(r, 422)
    found = pointers(problem)
    assert any(p == pointer or p.startswith(pointer + "/") for p in found), (pointer, problem)
    if field != "product_id":
        assert get(service, pid).status_code == 404, "a refused create left a product"


@pytest.mark.parametrize("missing", ["user_id", "name"])
def test_create_needs_user_id_and_name(service, missing):
    body = product_body(uid("req"))
    del body[missing]
    problem = assert_problem(create(service, body), 422)
    assert f"/{missing}" in pointers(problem), problem


def test_unknown_fields_are_422_naming_them(service):
    body = product_body(uid("unk"), colour="blue")
    problem = assert_problem(create(service, body), 422)
    assert "/colour" in pointers(problem) or "colour" in json.dumps(problem), problem
    for ts in ("created_at", "updated_at", "etag"):  # read-only members are not input
        problem = assert_problem(create(service, product_body(uid("ro"), **{ts: "x"})), 422)


def test_every_bad_field_is_listed(service):
    body = {"product_id": "a b", "user_id": "", "name": "", "images": ["ftp://x/y"], "price": -1, "stock": -1}
    problem = assert_problem(create(service, body), 422)
    found = pointers(problem)
    for p in ("/product_id", "/user_id", "/name", "/price", "/stock"):
        assert p in found, (p, problem)
    assert any(p.startswith("/images") for p in found), problem


def test_field_limits_are_inclusive(service):
    pid = "p" * 128
    r = create(service, {
        "product_id": pid, "user_id": "u" * 128, "name": EMOJI * 200, "description": EMOJI * 5000,
        "images": [OK_URL[:-2] + f"{i:02d}" for i in range(10)], "price": 0, "stock": 2**63 - 1,
        "version": 2**63 - 2,
    })  # fmt: skip
    doc = assert_document(r, 201)
    assert doc["name"] == EMOJI * 200 and len(doc["images"]) == 10
    assert doc["stock"] == 2**63 - 1 and doc["version"] == 2**63 - 2
    assert assert_document(create(service, product_body(uid("d0"), description="")), 201)["description"] == ""
    assert assert_document(create(service, product_body(uid("dn"), description=None)), 201)["description"] is None
    assert assert_document(create(service, product_body(uid("ie"), images=[])), 201)["images"] == []
    http_doc = assert_document(create(service, product_body(uid("http"), images=["http://example.com/a?b=c#d"])), 201)
    assert http_doc["images"] == [{"url": "http://example.com/a?b=c#d", "state": "pending"}]
    for pid in ("sku:42@eu", "a.b~c-d_e", "..."):
        assert assert_document(create(service, product_body(pid)), 201)["product_id"] == pid
        assert delete(service, pid).status_code == 204


BAD_BODIES = [
    # (label, content type, body, status)
    ("not-json", "application/json", b'{"user_id": "u", "name": ', 400),
    ("not-utf8", "application/json", b'{"user_id": "u", "name": "\xff\xfe"}', 400),
    ("empty", "application/json", b"", 400),
    ("array", "application/json", b'[{"user_id": "u", "name": "n"}]', 422),
    ("string", "application/json", b'"product"', 422),
    ("number", "application/json", b"5", 422),
    ("null", "application/json", b"null", 422),
    ("text-plain", "text/plain", b'{"user_id": "u", "name": "n"}', 415),
    ("ndjson", "application/x-ndjson", b'{"user_id": "u", "name": "n"}\n', 415),
    ("form", "application/x-www-form-urlencoded", b"user_id=u&name=n", 415),
    ("no-type", None, b'{"user_id": "u", "name": "n"}', 415),
    ("latin1", "application/json; charset=latin-1", b'{"user_id": "u", "name": "n"}', 415),
]


@pytest.mark.parametrize(("ctype", "body", "status"), [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_on_create(service, ctype, body, status):
    headers = {} if ctype is None else {"Content-Type": ctype}
    resp = raw_request(service.port, "POST", "/products", body, headers)
    problem = assert_problem(resp, status)
    if status == 422:
        assert "" in pointers(problem), problem  # the whole body is not an object


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
@pytest.mark.parametrize(("label", "ctype", "body", "status"), [
    ("not-json", "application/json", b"{", 400),
    ("empty", "application/json", b"", 400),
    ("array", "application/json", b"[1]", 422),
    ("text-plain", "text/plain", b"{}", 415),
    ("no-type", None, b"{}", 415),
])  # fmt: skip
def test_bad_bodies_on_put_and_patch(service, method, label, ctype, body, status):
    pid = created(service, uid("bb"))["product_id"]
    headers = {} if ctype is None else {"Content-Type": ctype}
    before = current(service, pid)
    problem = assert_problem(raw_request(service.port, method, f"/products/{pid}", body, headers), status)
    if status == 422:
        assert "" in pointers(problem), problem
    assert current(service, pid) == before, "a refused write changed the product"


JSON_SPELLINGS = ["application/json; charset=utf-8", "APPLICATION/JSON", "application/json;charset=UTF-8"]


@pytest.mark.parametrize("ctype", JSON_SPELLINGS)
def test_json_media_type_spellings_are_taken(service, ctype):
    pid = uid("ct")
    body = json.dumps(product_body(pid)).encode()
    resp = raw_request(service.port, "POST", "/products", body, {"Content-Type": ctype})
    assert resp[0] == 201, resp


def test_oversized_chunked_body_is_413(service):
    chunk = b"x" * 65536
    body = [b'{"user_id": "u", "name": "n", "description": "', *([chunk] * 70), b'"}']
    resp = raw_request(service.port, "POST", "/products", body, {"Content-Type": "application/json"}, chunked=True)
    assert_problem(resp, 413)
    assert_answering(service)


def test_oversized_body_is_413(service):
    body = json.dumps(product_body(uid("big"), description="x" * (4 * 1024 * 1024 + 10))).encode()
    for method, path in (("POST", "/products"), ("PUT", f"/products/{uid('big')}"),
                         ("PATCH", f"/products/{uid('big')}")):
        ctype = MERGE_PATCH if method == "PATCH" else "application/json"
        assert_problem(raw_request(service.port, method, path, body, {"Content-Type": ctype}), 413)
    assert_answering(service)


@pytest.mark.parametrize("bad", ["a%20b", "%2E", "%2E%2E", "p" * 129, "a%0Ab", "%C3%A9"])
def test_invalid_product_id_in_path_is_400(service, bad):
    body = json.dumps(product_body()).encode()
    for method, path, data, ctype in (
        ("GET", f"/products/{bad}", None, None),
        ("PUT", f"/products/{bad}", body, "application/json"),
        ("PATCH", f"/products/{bad}", b'{"price": 1}', MERGE_PATCH),
        ("DELETE", f"/products/{bad}", None, None),
        ("GET", f"/products/{bad}/inventory", None, None),
    ):
        headers = {"Content-Type": ctype} if ctype else {}
        problem = assert_problem(raw_request(service.port, method, path, data, headers), 400)
        assert_kind(problem, "invalid-product-id")


@pytest.mark.parametrize(("field", "value", "pointer"), [
    ("name", "", "/name"),
    ("name", "x" * 201, "/name"),
    ("name", None, "/name"),
    ("user_id", None, "/user_id"),
    ("user_id", "a b", "/user_id"),
    ("description", "d" * 5001, "/description"),
    ("images", ["javascript:alert(1)"], "/images/0"),
    ("images", ["https://example.com/a"] * 2, "/images"),
    ("price", -0.5, "/price"),
    ("stock", 1.25, "/stock"),
    ("version", -3, "/version"),
    ("colour", "red", "/colour"),
])  # fmt: skip
def test_patch_refuses_bad_fields(service, field, value, pointer):
    pid = created(service, uid("pb"), description="keep me")["product_id"]
    before = current(service, pid)
    problem = assert_problem(patch(service, pid, {field: value}), 422)
    found = pointers(problem)
    assert any(p == pointer or p.startswith(pointer + "/") for p in found) or (
        field == "colour" and "colour" in json.dumps(problem)), problem
    assert current(service, pid) == before


@pytest.mark.parametrize(("field", "value", "pointer"), [
    ("name", "", "/name"),
    ("images", ["ftp://example.com/a"], "/images/0"),
    ("images", [f"https://example.com/{i}" for i in range(11)], "/images"),
    ("stock", -1, "/stock"),
    ("colour", "red", "/colour"),
])  # fmt: skip
def test_put_refuses_bad_fields(service, field, value, pointer):
    pid = uid("putbad")
    body = product_body()
    body[field] = value
    problem = assert_problem(put(service, pid, body), 422)
    found = pointers(problem)
    assert any(p == pointer or p.startswith(pointer + "/") for p in found) or (
        field == "colour" and "colour" in json.dumps(problem)), problem
    assert get(service, pid).status_code == 404


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_body_product_id_other_than_the_path_is_refused(service, method):
    pid = created(service, uid("other"))["product_id"]
    before = current(service, pid)
    other = uid("other")
    if method == "PUT":
        r = put(service, pid, product_body(other))
    else:
        r = patch(service, pid, {"product_id": other})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert_problem(r)
    assert current(service, pid) == before
    assert get(service, other).status_code == 404


@pytest.mark.parametrize("missing", ["user_id", "name"])
def test_put_needs_user_id_and_name(service, missing):
    pid = created(service, uid("putreq"))["product_id"]
    body = product_body()
    del body[missing]
    assert f"/{missing}" in pointers(assert_problem(put(service, pid, body), 422))


def test_patch_cannot_half_catalogue_a_bare_product(service):
    pid = uid("bare")
    assert service.post({"product_id": pid, "price": 2}).status_code == 202
    before = current(service, pid)
    for body in ({"name": "only a name"}, {"user_id": "only-owner"}, {"description": "no owner"}):
        assert_problem(patch(service, pid, body), 422)
    assert current(service, pid) == before


def test_multi_get_refuses_bad_queries(service):
    for query in (f"ids={','.join(f'i{i}' for i in range(MAX_IDS + 1))}", "ids=a,b%20c",
                  "ids=a&limit=5", "ids=a&user_id=u", "ids=a&sort=price", "ids=a&cursor=x"):
        resp = raw_request(service.port, "GET", f"/products?{query}")
        assert 400 <= resp[0] < 500, (query, resp[0], resp[2][:300])
        assert_problem(resp)


def test_service_answers_after_all_the_bad_input(service):
    assert_answering(service)
    assert "Traceback" not in service.log_text()


# ---------------------------------------------------------------- create, read, replace, patch, delete


def test_create_with_product_id(service):
    pid = uid("c")
    body = product_body(pid, description="A mug.", images=["https://example.com/m.png"], price=9.5, stock=3)
    r = create(service, body)
    doc = assert_document(r, 201)
    assert r.headers["Location"].endswith(f"/products/{pid}"), r.headers
    assert r.headers["Location"] in (f"/products/{pid}", f"{service.url}/products/{pid}")
    assert as_input(doc, body) == body
    assert doc["version"] is None
    assert doc["created_at"] == doc["updated_at"]
    got = assert_document(get(service, pid))
    assert got == doc


def test_create_without_product_id_generates_sortable_ulids(service):
    ids = []
    for _ in range(5):
        r = create(service, product_body(name="generated"))
        doc = assert_document(r, 201)
        assert ULID.match(doc["product_id"]), doc["product_id"]
        assert r.headers["Location"].endswith("/products/" + doc["product_id"])
        assert assert_document(get(service, doc["product_id"])) == doc
        ids.append(doc["product_id"])
        time.sleep(0.003)  # a later millisecond: ULIDs sort by creation time
    assert ids == sorted(ids), ids


def test_generated_ids_are_unique_under_concurrency(service):
    out: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(10)

    def client(_i):
        with requests.Session() as http:
            start.wait()
            for _ in range(5):
                r = http.post(service.url + "/products", json=product_body(), timeout=TIMEOUT)
                assert r.status_code == 201, r.text
                with lock:
                    out.append(r.json()["product_id"])

    run_threads(client, 10)
    assert len(out) == 50 and len(set(out)) == 50


def test_create_existing_id_is_409(service):
    pid = created(service, uid("dup"), name="first")["product_id"]
    problem = assert_problem(create(service, product_body(pid, name="second")), 409)
    assert_kind(problem, "product-exists")
    assert current(service, pid)["name"] == "first"
    bare = uid("dupbare")  # a bare product (events only) exists too
    assert service.post({"product_id": bare, "stock": 1}).status_code == 202
    assert_kind(assert_problem(create(service, product_body(bare)), 409), "product-exists")


def test_get_etag_and_if_none_match(service):
    doc = created(service, uid("etag"))
    pid, tag = doc["product_id"], doc["etag"]
    r = get(service, pid)
    assert assert_document(r)["etag"] == tag
    for inm in (tag, f'"999999999", {tag}'):
        r = get(service, pid, {"If-None-Match": inm})
        assert r.status_code == 304, (inm, r.status_code, r.text)
        assert r.content == b""
        assert r.headers.get("ETag") == tag
    for inm in ("W/" + tag, "*"):  # If-None-Match compares weakly; * matches any current product
        assert get(service, pid, {"If-None-Match": inm}).status_code == 304, inm
    r = get(service, pid, {"If-None-Match": '"999999999"'})
    assert assert_document(r)["etag"] == tag
    head = requests.head(f"{service.url}/products/{pid}", timeout=TIMEOUT)
    assert head.status_code == 200 and head.headers["ETag"] == tag and head.content == b""
    assert_problem(get(service, uid("nope")), 404)
    assert_problem(get(service, uid("nope"), {"If-None-Match": tag}), 404)


def test_put_replaces_and_clears_what_it_leaves_out(service):
    pid = uid("put")
    first = created(service, pid, description="old", images=["https://example.com/1.png"], price=5, stock=6,
                    version=3)
    time.sleep(0.002)
    r = put(service, pid, {"user_id": "owner-2", "name": "Red mug"})
    doc = assert_document(r, 200)
    assert (doc["user_id"], doc["name"]) == ("owner-2", "Red mug")
    assert doc["description"] is None and doc["images"] == []
    assert doc["price"] is None and doc["stock"] is None
    assert doc["version"] == 3  # not a replaced field
    assert doc["created_at"] == first["created_at"] and doc["updated_at"] > first["updated_at"]
    assert doc["etag"] != first["etag"]
    assert current(service, pid) == doc


def test_put_on_a_bare_product_replaces_price_and_stock(service):
    pid = uid("putbare")
    assert service.post({"product_id": pid, "price": 3, "stock": 4, "version": 2}).status_code == 202
    bare = current(service, pid)
    doc = assert_document(put(service, pid, product_body()), 200)
    assert (doc["price"], doc["stock"], doc["version"], doc["name"]) == (None, None, 2, "Blue mug")
    assert doc["created_at"] == bare["created_at"]


def test_put_creates_when_absent(service):
    pid = uid("putnew")
    r = put(service, pid, product_body(price=1.5))
    doc = assert_document(r, 201)
    assert r.headers["Location"].endswith(f"/products/{pid}"), r.headers
    assert doc["product_id"] == pid and doc["price"] == 1.5
    assert current(service, pid) == doc
    assert assert_document(put(service, pid, product_body(price=2.5)), 200)["price"] == 2.5


def test_patch_merges(service):
    pid = uid("patch")
    first = created(service, pid, description="A mug.", images=["https://example.com/a.png"], price=9, stock=4)
    doc = assert_document(patch(service, pid, {"description": None}))
    assert doc["description"] is None
    assert (doc["name"], urls(doc), doc["price"], doc["stock"]) == ("Blue mug", ["https://example.com/a.png"], 9, 4)
    doc = assert_document(patch(service, pid, {"price": 12.25, "stock": 0}))
    assert (doc["price"], doc["stock"], doc["description"]) == (12.25, 0, None)
    doc = assert_document(patch(service, pid, {"images": ["https://example.com/b.png", "http://example.com/c"]}))
    assert urls(doc) == ["https://example.com/b.png", "http://example.com/c"]  # arrays are replaced whole
    doc = assert_document(patch(service, pid, {"name": "Green mug", "price": None}))
    assert doc["name"] == "Green mug" and doc["price"] is None and doc["user_id"] == "owner-1"
    doc = assert_document(patch(service, pid, {"stock": 7}, content_type="application/json"))  # accepted too
    assert doc["stock"] == 7
    assert doc["created_at"] == first["created_at"]
    assert current(service, pid) == doc


def test_patch_media_types(service):
    pid = created(service, uid("pmt"))["product_id"]
    doc = assert_document(patch(service, pid, {"price": 1}, content_type=MERGE_PATCH + "; charset=utf-8"))
    assert doc["price"] == 1
    json_patch = [{"op": "replace", "path": "/price", "value": 2}]
    r = patch(service, pid, json_patch, content_type="application/json-patch+json")
    assert_problem(r, 415)
    assert MERGE_PATCH in r.headers.get("Accept-Patch", ""), r.headers  # RFC 5789: say what PATCH takes
    assert current(service, pid)["price"] == 1


def test_patch_unknown_is_404(service):
    assert_problem(patch(service, uid("nopatch"), {"price": 1}), 404)


def test_patch_catalogues_a_bare_product(service):
    pid = uid("tocat")
    assert service.post({"product_id": pid, "price": 3, "stock": 2}).status_code == 202
    bare = current(service, pid)
    assert (bare["user_id"], bare["name"], bare["description"], bare["images"]) == (None, None, None, [])
    doc = assert_document(patch(service, pid, {"user_id": "owner-9", "name": "Now catalogued"}))
    assert (doc["price"], doc["stock"], doc["user_id"]) == (3, 2, "owner-9")


def test_delete(service):
    first = created(service, uid("del"))
    pid, first_tag = first["product_id"], first["etag"]
    r = delete(service, pid)
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert_problem(get(service, pid), 404)
    assert_problem(delete(service, pid), 404)
    assert_problem(patch(service, pid, {"price": 1}), 404)
    assert_problem(inventory(service, pid), 404)
    assert_problem(delete(service, uid("never")), 404)
    assert pid in multi_get(service, [pid]).json()["not_found"]
    again = assert_document(create(service, product_body(pid, name="again")), 201)
    assert again["name"] == "again" and again["version"] is None
    old_tag, current_tag = first_tag, again["etag"]
    assert current_tag != old_tag  # an ETag of the deleted product never matches the new one
    assert_problem(patch(service, pid, {"price": 1}, {"If-Match": old_tag}), 412)
    assert delete(service, pid).status_code == 204
    assert service.post({"product_id": pid, "stock": 2}).status_code == 202  # an event creates a bare one
    bare = current(service, pid)
    assert (bare["name"], bare["stock"]) == (None, 2) and bare["etag"] not in (old_tag, current_tag)


def test_delete_a_bare_product(service):
    pid = uid("delbare")
    assert service.post({"product_id": pid, "stock": 1}).status_code == 202
    assert delete(service, pid).status_code == 204
    assert_problem(get(service, pid), 404)


# ---------------------------------------------------------------- versions, events, conditions


def test_stale_version_is_409(service):
    pid = created(service, uid("ver"), version=5)["product_id"]
    for write in (
        lambda: patch(service, pid, {"price": 1, "version": 5}),
        lambda: patch(service, pid, {"price": 1, "version": 4}),
        lambda: put(service, pid, product_body(version=5)),
        lambda: put(service, pid, product_body(version=0)),
    ):
        assert_kind(assert_problem(write(), 409), "stale-version")
    assert current(service, pid)["price"] is None
    doc = assert_document(patch(service, pid, {"price": 2, "version": 6}))
    assert (doc["price"], doc["version"]) == (2, 6)
    doc = assert_document(patch(service, pid, {"price": 3}))  # no version: applies, keeps the stored one
    assert (doc["price"], doc["version"]) == (3, 6)
    assert service.post({"product_id": pid, "price": 99, "version": 6}).status_code == 202  # a stale event
    assert current(service, pid)["price"] == 3
    doc = assert_document(put(service, pid, product_body(version=10)))
    assert doc["version"] == 10


def test_events_on_a_catalogued_product(service):
    pid = uid("ev")
    first = created(service, pid, description="d", images=["https://example.com/x.png"], price=1, stock=1)
    assert service.post({"product_id": pid, "price": 4.5, "stock": 8, "version": 2}).status_code == 202
    after = assert_document(get(service, pid))
    assert (after["price"], after["stock"], after["version"]) == (4.5, 8, 2)
    for key in ("user_id", "name", "description", "images", "created_at"):
        assert after[key] == first[key], key
    assert after["etag"] != first["etag"]
    assert_kind(assert_problem(patch(service, pid, {"stock": 1}, {"If-Match": first["etag"]}), 412),
                "precondition-failed")
    assert assert_document(patch(service, pid, {"stock": 1}, {"If-Match": after["etag"]}))["stock"] == 1


def test_etag_changes_with_every_write_and_only_then(service):
    pid = uid("tags")
    tags = [created(service, pid)["etag"]]
    assert get(service, pid).headers["ETag"] == tags[-1]  # a read changes nothing
    tags.append(assert_document(patch(service, pid, {"price": 1}))["etag"])
    tags.append(assert_document(put(service, pid, product_body()))["etag"])
    assert service.post({"product_id": pid, "stock": 3}).status_code == 202
    tags.append(current(service, pid)["etag"])
    assert len(set(tags)) == len(tags), tags
    assert assert_document(get(service, pid))["etag"] == tags[-1]


def test_if_match(service):
    pid = uid("ifm")
    tag = created(service, pid)["etag"]
    stale = f'"{int(tag.strip(chr(34))) + 1_000_000}"'  # a revision this product never had
    for write in (
        lambda h: patch(service, pid, {"price": 1}, h),
        lambda h: put(service, pid, product_body(price=1), h),
        lambda h: delete(service, pid, h),
        lambda h: patch(service, pid, {"price": 1}, {"If-Match": "W/" + tag}),  # If-Match compares strongly
    ):
        problem = assert_problem(write({"If-Match": stale}), 412)
        assert_kind(problem, "precondition-failed")
        assert problem.get("etag") in (None, tag), problem  # when it says the current ETag, it is right
    assert current(service, pid)["etag"] == tag  # nothing applied
    tag = assert_document(patch(service, pid, {"price": 2}, {"If-Match": tag}))["etag"]
    tag = assert_document(patch(service, pid, {"price": 3}, {"If-Match": f'{stale}, {tag}'}))["etag"]
    tag = assert_document(put(service, pid, product_body(price=4), {"If-Match": tag}))["etag"]
    tag = assert_document(patch(service, pid, {"price": 5}, {"If-Match": "*"}))["etag"]
    assert_problem(delete(service, pid, {"If-Match": stale}), 412)
    assert delete(service, pid, {"If-Match": tag}).status_code == 204
    assert_problem(get(service, pid), 404)


def test_if_match_star_and_if_none_match_star_on_put(service):
    absent = uid("absent")
    for write in (
        lambda: put(service, absent, product_body(), {"If-Match": "*"}),
        lambda: patch(service, absent, {"price": 1}, {"If-Match": "*"}),
        lambda: delete(service, absent, {"If-Match": "*"}),
        lambda: put(service, absent, product_body(), {"If-Match": '"5"'}),
    ):
        assert_kind(assert_problem(write(), 412), "precondition-failed")
    assert_problem(get(service, absent), 404)
    doc = assert_document(put(service, absent, product_body(), {"If-None-Match": "*"}), 201)
    assert_kind(assert_problem(put(service, absent, product_body(name="x"), {"If-None-Match": "*"}), 412),
                "precondition-failed")
    assert current(service, absent) == doc
    assert assert_document(put(service, absent, product_body(name="y"), {"If-Match": "*"}))["name"] == "y"


def run_threads(target, count: int) -> None:
    errors: list[BaseException] = []

    def wrapped(i):
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_DEADLINE)
        assert not t.is_alive(), "a client thread hung"
    if errors:
        raise errors[0]


def race(svc, count: int, request) -> list[requests.Response]:
    """`count` threads, each with its own connection, send `request(session, i)` at once."""
    results: list[requests.Response | None] = [None] * count
    sessions = [requests.Session() for _ in range(count)]
    for s in sessions:  # connect first, so that the requests leave together
        s.get(svc.url + "/healthz", timeout=TIMEOUT)
    start = threading.Barrier(count)

    def client(i):
        start.wait()
        results[i] = request(sessions[i], i)

    try:
        run_threads(client, count)
    finally:
        for s in sessions:
            s.close()
    return results  # type: ignore[return-value]


def test_if_match_race_exactly_one_winner_per_version(service):
    pid = uid("race")
    tag = created(service, pid, stock=0)["etag"]
    for round_ in range(5):
        results = race(service, RACERS, lambda s, i, r_=round_, t=tag: patch(service, pid, {"stock": 1000 * r_ + i},
                                                                               {"If-Match": t}, session=s))
        winners = [i for i, r in enumerate(results) if 200 <= r.status_code < 300]
        losers = [r for r in results if r.status_code == 412]
        assert len(winners) == 1, [(r.status_code, r.text[:200]) for r in results]
        assert len(losers) == RACERS - 1, [(r.status_code, r.text[:200]) for r in results]
        for r in losers:
            assert_kind(assert_problem(r, 412), "precondition-failed")
        won = results[winners[0]].json()
        now = current(service, pid)
        assert now["stock"] == 1000 * round_ + winners[0] == won["stock"]
        assert now["etag"] == won["etag"] != tag
        tag = now["etag"]


def test_create_race_exactly_one_winner(service):
    pid = uid("crace")
    results = race(service, RACERS, lambda s, i: s.post(service.url + "/products", json=product_body(pid, name=f"n{i}"),
                                                        timeout=TIMEOUT))
    codes = sorted(r.status_code for r in results)
    assert codes == [201] + [409] * (RACERS - 1), codes
    winner = next(r for r in results if r.status_code == 201).json()
    assert current(service, pid)["name"] == winner["name"]

    pid = uid("prace")  # PUT If-None-Match: * (create only) races the same way
    results = race(service, RACERS, lambda s, i: s.put(f"{service.url}/products/{pid}", json=product_body(name=f"n{i}"),
                                                       headers={"If-None-Match": "*"}, timeout=TIMEOUT))
    codes = sorted(r.status_code for r in results)
    assert codes == [201] + [412] * (RACERS - 1), codes


def test_delete_race_exactly_one_winner(service):
    pid = uid("drace")
    tag = created(service, pid)["etag"]
    results = race(service, RACERS, lambda s, i: s.delete(f"{service.url}/products/{pid}", headers={"If-Match": tag},
                                                          timeout=TIMEOUT))
    codes = sorted(r.status_code for r in results)
    assert codes == [204] + [412] * (RACERS - 1), codes


# ---------------------------------------------------------------- multi-get and inventory


def test_multi_get_order_unknown_and_duplicates(service):
    base = uid("mg")
    ids = [f"{base}-{i}" for i in range(8)]  # spread over the shards
    docs = {pid: created(service, pid, price=i) for i, pid in enumerate(ids)}
    bare = f"{base}-bare"
    assert service.post({"product_id": bare, "stock": 5}).status_code == 202
    docs[bare] = current(service, bare)
    unknown = [f"{base}-u1", f"{base}-u2"]
    asked = [ids[5], unknown[0], ids[1], bare, ids[5], ids[0], unknown[1], ids[7], unknown[0]]
    r = multi_get(service, asked)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].split(";")[0] == "application/json"
    body = r.json()
    assert set(body) >= {"products", "not_found"}, body
    want = [ids[5], ids[1], bare, ids[0], ids[7]]
    assert [p["product_id"] for p in body["products"]] == want
    assert [p for p in body["products"]] == [docs[pid] for pid in want]  # the same document as a single GET
    assert body["not_found"] == unknown
    r = multi_get(service, unknown)
    assert r.status_code == 200, r.text
    assert (r.json()["products"], r.json()["not_found"]) == ([], unknown)
    one = multi_get(service, [ids[3]]).json()
    assert one["products"] == [docs[ids[3]]] and one["not_found"] == []


def test_multi_get_reads_your_writes(service):
    base = uid("mgryw")
    ids = [f"{base}-{i}" for i in range(6)]
    for pid in ids:
        created(service, pid, stock=0)
    for round_ in range(1, 6):
        for pid in ids:
            assert patch(service, pid, {"stock": round_}).status_code == 200
        assert service.post([{"product_id": pid, "price": round_} for pid in ids]).status_code == 202
        got = multi_get(service, ids).json()["products"]
        assert [(p["stock"], p["price"]) for p in got] == [(round_, round_)] * len(ids)
        assert [p["etag"] for p in got] == [current(service, pid)["etag"] for pid in ids]


def test_multi_get_limit(service):
    prefix = short_prefix()
    ids = [f"{prefix}{i:03x}" for i in range(MAX_IDS)]  # short: 1,000 of them fit the request target
    present = ids[::97]
    for pid in present:
        created(service, pid)
    r = multi_get(service, ids)
    assert r.status_code == 200, r.text[:500]
    body = r.json()
    assert [p["product_id"] for p in body["products"]] == present
    assert body["not_found"] == [pid for pid in ids if pid not in present]
    resp = raw_request(service.port, "GET", "/products?ids=" + ",".join([*ids, prefix + "zzz"]))
    assert 400 <= resp[0] < 500, (resp[0], resp[2][:300])
    assert_problem(resp)
    # duplicates are answered once
    resp = raw_request(service.port, "GET", "/products?ids=" + ",".join([present[0]] * 10))
    assert resp[0] == 200 and [p["product_id"] for p in json.loads(resp[2])["products"]] == [present[0]]
    # all 1,000 there (bare products from one bulk of events): 1,000 documents, in the order asked
    assert service.post([{"product_id": pid, "stock": i} for i, pid in enumerate(ids)]).status_code == 202
    body = multi_get(service, ids[::-1]).json()
    assert [(p["product_id"], p["stock"]) for p in body["products"]] == [(pid, ids.index(pid)) for pid in ids[::-1]]
    assert body["not_found"] == []


def test_inventory(service):
    pid = uid("inv")
    created(service, pid, stock=7)
    r = inventory(service, pid)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == INVENTORY_KEYS, body
    assert body == {"product_id": pid, "stock": 7, "reserved": 0, "available": 7, "updated_at": body["updated_at"]}
    doc = current(service, pid)
    assert r.headers["ETag"] == doc["etag"] and body["updated_at"] == doc["updated_at"]
    assert service.post({"product_id": pid, "stock": 2}).status_code == 202
    r = inventory(service, pid)
    assert (r.json()["stock"], r.json()["available"]) == (2, 2)
    assert r.headers["ETag"] == current(service, pid)["etag"] != doc["etag"]
    assert_problem(inventory(service, uid("noinv")), 404)
    bare = uid("invbare")
    assert service.post({"product_id": bare, "stock": 11}).status_code == 202
    assert inventory(service, bare).json()["available"] == 11
    nostock = created(service, uid("invnone"))["product_id"]
    body = inventory(service, nostock).json()
    assert body["stock"] is None and body["reserved"] == 0 and body["available"] == body["stock"]


def test_large_product_round_trips(service):
    pid = uid("large")
    images = [f"https://example.com/{i:02d}/" + "x" * (2048 - len("https://example.com/00/")) for i in range(10)]
    assert all(len(u) == 2048 for u in images)
    body = product_body(pid, name=EMOJI * 200, description=EMOJI * 5000, images=images, price=1, stock=1)
    assert len(json.dumps(body, ensure_ascii=False).encode()) > 40_000
    doc = assert_document(create(service, body), 201)
    assert as_input(doc, body) == body
    assert current(service, pid) == doc
    assert multi_get(service, [pid, uid("nope")]).json()["products"] == [doc]
    doc = assert_document(patch(service, pid, {"stock": 2, "description": EMOJI * 4999 + "!"}))
    assert doc["description"] == EMOJI * 4999 + "!" and urls(doc) == images
    body.pop("product_id")
    doc = assert_document(put(service, pid, body))
    assert as_input(doc, body) == body
    assert current(service, pid) == doc


def big_product(pid: str, mark: str) -> dict:
    images = [f"https://example.com/{mark}/{i:02d}/" + "z" * 1900 for i in range(10)]
    return product_body(pid, name=mark, description=EMOJI * 5000, images=images, stock=1)


def test_concurrent_large_writes_do_not_mix(service):
    """Bodies cut into several frames, from many clients at once to the same shards: each is
    joined whole (a product is never made of two requests' parts)."""
    base = uid("mix")
    ids = [f"{base}-{i}" for i in range(12)]

    def client(i):
        with requests.Session() as http:
            for round_ in range(3):
                mark = f"m{i}-{round_}"
                body = big_product(ids[i % 4], mark)
                r = http.put(f"{service.url}/products/{body.pop('product_id')}", json=body, timeout=TIMEOUT)
                assert r.status_code in (200, 201), r.text[:300]
                assert r.json()["images"][0]["url"].split("/")[3] == mark

    run_threads(client, 12)
    for pid in ids[:4]:
        doc = current(service, pid)
        mark = doc["name"]
        assert as_input(doc, doc) == {**as_input(doc, doc), **big_product(pid, mark)}, pid


def test_multi_get_with_big_answers(service):
    """A multi-get whose answer is megabytes: every shard's reply comes back whole, in pieces."""
    base = uid("mgbig")
    ids = [f"{base}-{i}" for i in range(40)]
    for pid in ids:
        assert create(service, big_product(pid, pid[-6:])).status_code == 201
    r = multi_get(service, [*ids, f"{base}-none"])
    assert r.status_code == 200, r.text[:300]
    assert len(r.content) > 1_000_000
    body = r.json()
    assert [p["product_id"] for p in body["products"]] == ids and body["not_found"] == [f"{base}-none"]
    assert all(p["description"] == EMOJI * 5000 and len(p["images"]) == 10 for p in body["products"])


def test_read_your_writes_through_the_owner(service):
    pid = uid("ryw")
    created(service, pid, stock=0)
    with requests.Session() as http:
        for i in range(1, 30):
            r = http.patch(f"{service.url}/products/{pid}", data=json.dumps({"stock": i}),
                           headers={"Content-Type": MERGE_PATCH}, timeout=TIMEOUT)
            assert r.status_code == 200
            assert http.get(f"{service.url}/products/{pid}", timeout=TIMEOUT).json()["stock"] == i


# ---------------------------------------------------------------- auth


def _token_file(directory, token: str):
    path = directory / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def _unauthorized(r: requests.Response) -> None:
    assert_problem(r, 401)
    assert r.headers.get("WWW-Authenticate", "").startswith("Bearer"), r.headers


@pytest.mark.parametrize("auth_reads", [False, True])
def test_auth_token(start_service, tmp_path, auth_reads):
    token = "tok-" + uid("secret")
    path = _token_file(tmp_path, token)
    args = ["--auth-token-file", str(path), *(["--auth-reads"] if auth_reads else [])]
    svc = start_service(shards=2, workers=1, extra_args=args)
    good = {"Authorization": f"Bearer {token}"}
    pid = uid("auth")
    for h in (None, {"Authorization": "Bearer wrong"}):
        _unauthorized(create(svc, product_body(pid), h))
        _unauthorized(put(svc, pid, product_body(), h))
        _unauthorized(patch(svc, pid, {"price": 1}, h))
        _unauthorized(delete(svc, pid, h))
    _unauthorized(create(svc, "not even a product"))  # refused before the body is looked at
    assert get(svc, pid, good).status_code == 404  # nothing of the refused writes was applied
    assert create(svc, product_body(pid), good).status_code == 201
    assert put(svc, pid, product_body(price=1), good).status_code == 200
    assert patch(svc, pid, {"price": 2}, good).status_code == 200
    reads = (lambda h: get(svc, pid, h), lambda h: multi_get(svc, [pid], h), lambda h: inventory(svc, pid, h))
    for read in reads:
        if auth_reads:
            _unauthorized(read(None))
            _unauthorized(read({"Authorization": "Bearer wrong"}))
        else:
            assert read(None).status_code == 200
        assert read(good).status_code == 200
    _unauthorized(delete(svc, pid))
    assert delete(svc, pid, good).status_code == 204
    assert svc.stop() == 0
    assert token not in svc.log_text()


# ---------------------------------------------------------------- durability


def _durable(start_service, data_dir, durability: str):
    return start_service(shards=2, workers=1, extra_args=["--data-dir", str(data_dir)],
                         env={"PRODUCTD_DURABILITY": durability})


@pytest.mark.parametrize("durability", ["batch", "sync"])
def test_catalogue_survives_restart(start_service, tmp_path, durability):
    data = tmp_path / "data"
    svc = _durable(start_service, data, durability)
    base = uid("dur")
    kept, gone, replaced, bare = (f"{base}-{k}" for k in ("kept", "gone", "put", "bare"))
    images = [f"https://example.com/{i}" for i in range(3)]
    created(svc, kept, description="first", images=images, price=1, stock=1, version=1)
    assert patch(svc, kept, {"description": None, "stock": 5, "version": 2}).status_code == 200
    created(svc, gone)
    assert delete(svc, gone).status_code == 204
    created(svc, replaced, description="x")
    assert put(svc, replaced, {"user_id": "owner-7", "name": "replaced"}).status_code == 200
    assert svc.post({"product_id": bare, "price": 3}).status_code == 202
    assert svc.post({"product_id": kept, "price": 8}).status_code == 202
    large = f"{base}-large"
    created(svc, large, description=EMOJI * 5000, images=[f"https://example.com/{i}/" + "y" * 2000 for i in range(10)])
    before = {pid: current(svc, pid) for pid in (kept, replaced, bare, large)}
    assert svc.stop() == 0, svc.log_tail()

    svc = _durable(start_service, data, durability)
    for pid, doc in before.items():
        assert current(svc, pid) == doc, pid
    assert_problem(get(svc, gone), 404)
    assert multi_get(svc, [gone, kept]).json()["not_found"] == [gone]
    # revisions go on after the restart: a new write never shows an ETag the product had
    doc = assert_document(patch(svc, kept, {"stock": 6}, {"If-Match": before[kept]["etag"]}))
    assert doc["etag"] != before[kept]["etag"]
    assert_kind(assert_problem(create(svc, product_body(kept)), 409), "product-exists")
    assert_kind(assert_problem(patch(svc, kept, {"version": 2}), 409), "stale-version")
    after_write = current(svc, kept)
    if durability == "sync":  # every 2xx write is on disk: it survives a shard's kill -9 ...
        owner = svc.shard_pids()
        for pid in owner:
            os.kill(pid, signal.SIGKILL)
        # The new pids first, then /readyz: a /readyz read before the supervisor saw the kills
        # still shows the dead shards ready (the restarted ones load, and scan for pending images).
        svc.wait_for(lambda: set(svc.shard_pids()).isdisjoint(owner) and svc.readyz().status_code == 200,
                     "the shards restarted")
        assert current(svc, kept) == after_write
        assert_problem(get(svc, gone), 404)
        svc.kill()  # ... and a crash of the whole service
        svc = _durable(start_service, data, durability)
        assert current(svc, kept) == after_write
        assert_problem(get(svc, gone), 404)
    assert svc.stop() == 0, svc.log_tail()


def test_an_etag_from_before_a_state_loss_does_not_match(start_service):
    svc = start_service(shards=1, workers=1)
    pid = uid("lost")
    old_tag = created(svc, pid, name="first")["etag"]
    old = svc.shard_pids()
    os.kill(old[0], signal.SIGKILL)
    # The new pid first, then /readyz: checked the other way round, a 200 read just before the old
    # shard died passed with the new one still starting (a 503 below, seen once in CI).
    svc.wait_for(lambda: svc.shard_pids() != old and svc.readyz().status_code == 200, "the shard restarted")
    assert_problem(get(svc, pid), 404)  # memory only: the state is gone, as documented
    created(svc, pid, name="second")
    r = patch(svc, pid, {"price": 1}, {"If-Match": old_tag})
    assert r.status_code == 412, f"If-Match {old_tag} from the lost 'first' product applied to 'second': {r.text}"


def test_reshard_keeps_catalogued_products_and_their_etags(start_service, tmp_path):
    """--reshard moves products between shards: their details, versions, timestamps and ETags
    move with them, deleted ones stay deleted, and the new owners' revisions go on above theirs."""
    data = tmp_path / "data"
    svc = start_service(shards=2, workers=1, extra_args=["--data-dir", str(data)], env={"PRODUCTD_DURABILITY": "batch"})
    base = uid("rs")
    ids = [f"{base}-{i}" for i in range(40)]
    for i, pid in enumerate(ids):
        body = big_product(pid, f"r{i}") if i % 10 == 0 else product_body(pid, price=i, stock=i, version=i)
        assert create(svc, body).status_code == 201
    for pid in ids[1::3]:
        assert patch(svc, pid, {"description": "patched"}).status_code == 200
    for pid in ids[2::7]:
        assert delete(svc, pid).status_code == 204
    before = {pid: (r.json() if r.status_code == 200 else None) for pid in ids for r in [get(svc, pid)]}
    assert svc.stop() == 0, svc.log_tail()

    svc = start_service(shards=5, workers=1, extra_args=["--data-dir", str(data), "--reshard"],
                        env={"PRODUCTD_DURABILITY": "batch"})
    assert len(svc.shard_info()) == 5
    after = {pid: (r.json() if r.status_code == 200 else None) for pid in ids for r in [get(svc, pid)]}
    assert after == before, [pid for pid in ids if after[pid] != before[pid]][:5]
    got = multi_get(svc, ids).json()
    assert got["not_found"] == [pid for pid in ids if before[pid] is None]
    for pid in ids:
        if before[pid] is None:
            continue
        doc = assert_document(patch(svc, pid, {"stock": 99}, {"If-Match": before[pid]["etag"]}))
        assert doc["etag"] != before[pid]["etag"], pid
        old, new = int(before[pid]["etag"].strip('"')), int(doc["etag"].strip('"'))
        assert new > old, (pid, old, new)
    assert svc.stop() == 0, svc.log_tail()


NOT_URI = ["https://example.com/<script>", "https://example.com/a\"b", "https://example.com/{x}", "https://example.com/a|b",
           "https://example.com/a^b", "https://example.com/a\\b", "https://example.com/%zz", "https://example.com/a#b#c"]


@pytest.mark.parametrize("url", NOT_URI)
def test_image_urls_are_rfc3986_uris(service, url):
    problem = assert_problem(create(service, product_body(uid("uri"), images=[url])), 422)
    assert "/images/0" in pointers(problem)
