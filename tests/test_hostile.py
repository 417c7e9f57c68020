"""A table of hostile requests: each gets a precise 4xx problem, never a 5xx, and nothing of it is applied.

After the table the same service must still answer correctly with the same processes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pytest
import requests
from service import TIMEOUT, assert_problem, pointers, raw_request, uid

P = uid("hostile")  # every product id in the table starts with this
JSON = {"Content-Type": "application/json"}
NDJSON = {"Content-Type": "application/x-ndjson"}
MAX_BODY = 4 * 1024 * 1024  # the documented default --max-body-bytes
MAX_EVENTS = 10_000  # the documented default --max-events
VALID_ID = re.compile(r"[A-Za-z0-9._~:@-]{1,128}")


@dataclass
class Case:
    name: str
    status: int | tuple[int, ...]
    body: bytes | None = None
    headers: dict = field(default_factory=lambda: dict(JSON))
    method: str = "POST"
    path: str = "/events"
    pointers: tuple[str, ...] = ()  # each must appear in `errors`
    absent: tuple[str, ...] = ()  # product ids that must still be unknown afterwards
    chunks: object = None  # an iterable of chunks: send chunked instead of `body`


CASES: list[Case] = []


def pid(n: str) -> str:
    return f"{P}-{n}"


def add(case: Case) -> None:
    CASES.append(case)


def event_case(name: str, event: dict, ptr: str | None, status: int | tuple = 422) -> None:
    """One event object whose product id (if valid) must not become known."""
    product = event.get("product_id")
    valid = isinstance(product, str) and VALID_ID.fullmatch(product) and product not in (".", "..")
    absent = (product,) if valid else ()
    add(Case(name, status, json.dumps(event).encode(), pointers=(ptr,) if ptr else (), absent=absent))


def raw_case(name: str, text: bytes, ptr: str | None, status: int | tuple, absent: tuple = ()) -> None:
    add(Case(name, status, text, pointers=(ptr,) if ptr else (), absent=absent))


# -- wrong types and out-of-range values in one event (422, naming the field)
for field_name, value, label in [
    ("price", "49.99", "price-string"),
    ("price", True, "price-true"),
    ("price", False, "price-false"),
    ("price", -1, "price-negative-int"),
    ("price", -0.01, "price-negative-float"),
    ("price", [], "price-array"),
    ("price", {}, "price-object"),
    ("stock", True, "stock-true"),
    ("stock", False, "stock-false"),
    ("stock", -1, "stock-negative"),
    ("stock", 1.5, "stock-fraction"),
    ("stock", 1e17, "stock-float-beyond-2^53"),
    ("version", 1e300, "version-float-huge"),
    ("stock", "5", "stock-string"),
    ("stock", 2**63, "stock-2^63"),
    ("stock", 2**64, "stock-2^64"),
    ("stock", 10**30, "stock-10^30"),
    ("stock", None, "stock-null"),
    ("version", True, "version-true"),
    ("version", -1, "version-negative"),
    ("version", 2**63, "version-2^63"),
    ("version", 2**64, "version-2^64"),
    ("version", 1.5, "version-fraction"),
    ("version", "7", "version-string"),
]:
    other = {"stock": 1} if field_name != "stock" else {"price": 1}
    event_case(label, {"product_id": pid(label), **other, field_name: value}, f"/{field_name}")

# -- numbers JSON cannot hold or does not have
raw_case("price-1e400", f'{{"product_id": "{pid("e400")}", "price": 1e400}}'.encode(), "/price", 422, (pid("e400"),))
raw_case("price--1e400", f'{{"product_id": "{pid("me400")}", "price": -1e400}}'.encode(), "/price", 422,
         (pid("me400"),))
raw_case("stock-1e400", f'{{"product_id": "{pid("se400")}", "stock": 1e400}}'.encode(), "/stock", 422,
         (pid("se400"),))
raw_case("stock-1e2-fraction", f'{{"product_id": "{pid("s1e2")}", "stock": 1.5e0}}'.encode(), "/stock", 422,
         (pid("s1e2"),))
raw_case("price-NaN", f'{{"product_id": "{pid("nan")}", "price": NaN}}'.encode(), None, 400, (pid("nan"),))
raw_case("price-Infinity", f'{{"product_id": "{pid("inf")}", "price": Infinity}}'.encode(), None, 400,
         (pid("inf"),))
raw_case("price--Infinity", f'{{"product_id": "{pid("minf")}", "price": -Infinity}}'.encode(), None, 400,
         (pid("minf"),))
raw_case("version-huge-literal", f'{{"product_id": "{pid("vhuge")}", "stock": 1, "version": {"9" * 400}}}'.encode(),
         "/version", 422, (pid("vhuge"),))

# -- product ids
for label, value in [
    ("id-int", 123),
    ("id-null", None),
    ("id-bool", True),
    ("id-array", [pid("x")]),
    ("id-empty", ""),
    ("id-dot", "."),
    ("id-dotdot", ".."),
    ("id-slash", f"{P}/a"),
    ("id-129", (P + "x" * 129)[:129]),
    ("id-nul", f"{P}\u0000a"),
    ("id-newline", f"{P}\na"),
    ("id-tab", f"{P}\ta"),
    ("id-del", f"{P}\u007f"),
    ("id-space", f"{P} a"),
    ("id-non-ascii", f"{P}-\u00fc"),
    ("id-percent", f"{P}%2Fa"),
    ("id-question", f"{P}?a"),
    ("id-hash", f"{P}#a"),
    ("id-backslash", f"{P}\\a"),
]:
    event_case(label, {"product_id": value, "price": 1}, "/product_id")
raw_case("id-lone-surrogate", b'{"product_id": "a\\ud800", "price": 1}', None, (400, 422))

# -- shape of the event
event_case("unknown-field", {"product_id": pid("unk"), "price": 1, "colour": "red"}, "/colour")
event_case("unknown-field-slash", {"product_id": pid("unk2"), "price": 1, "a/b": 1}, "/a~1b")
event_case("missing-product-id", {"price": 1, "stock": 2}, "/product_id")
event_case("neither-price-nor-stock", {"product_id": pid("neither")}, None)
event_case("only-version", {"product_id": pid("onlyv"), "version": 3}, None)
event_case("price-null-only", {"product_id": pid("pnull"), "price": None}, None)
raw_case("json-string", b'"hello"', None, 422)
raw_case("json-number", b"42", None, 422)
raw_case("json-null", b"null", None, 422)
raw_case("json-true", b"true", None, 422)
raw_case("array-of-number", b"[1]", "/0", 422)
raw_case("array-of-array", f'[[{{"product_id": "{pid("nest")}", "price": 1}}]]'.encode(), "/0", 422,
         (pid("nest"),))
raw_case("array-of-null", b"[null]", "/0", 422)

# -- malformed bodies (400)
raw_case("empty-body", b"", None, 400)
raw_case("whitespace-body", b"  \n\t ", None, 400)
raw_case("empty-array", b"[]", None, 400)
raw_case("truncated", f'{{"product_id": "{pid("trunc")}", "price": 1'.encode(), None, 400, (pid("trunc"),))
raw_case("trailing-garbage", f'{{"product_id": "{pid("trail")}", "price": 1}} x'.encode(), None, 400,
         (pid("trail"),))
raw_case("two-objects", f'{{"product_id": "{pid("two")}", "price": 1}}{{"product_id": "{pid("two")}", "price": 2}}'
         .encode(), None, 400, (pid("two"),))
raw_case("single-quotes", f"{{'product_id': '{pid('sq')}', 'price': 1}}".encode(), None, 400)
raw_case("deep-nesting-open", b"[" * 100_000, None, 400)
raw_case("deep-nesting-closed", b"[" * 100_000 + b"]" * 100_000, None, (400, 422))
raw_case("deep-object-nesting", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, None, (400, 422))
raw_case("invalid-utf8", b'{"product_id": "\xff\xfe", "price": 1}', None, 400)
raw_case("invalid-utf8-overlong", b'{"product_id": "a\xc0\xafb", "price": 1}', None, 400)
raw_case("invalid-utf8-in-valid-event", f'{{"product_id": "{pid("u8")}", "price": 1, "x": "\xe9"}}'.encode("latin-1"),
         None, 400, (pid("u8"),))
raw_case("utf16-body", f'{{"product_id": "{pid("u16")}", "price": 1}}'.encode("utf-16"), None, 400,
         (pid("u16"),))

# -- bulk arrays: validated whole, nothing applied, every bad item named by index
good = [pid("bulk-good-0"), pid("bulk-good-2")]
add(Case("bulk-one-bad-price", 422, json.dumps([
    {"product_id": good[0], "price": 1},
    {"product_id": pid("bulk-bad-1"), "price": "x"},
    {"product_id": good[1], "stock": 2},
]).encode(), pointers=("/1/price",), absent=(*good, pid("bulk-bad-1"))))
good2 = [pid("bulk2-good-1"), pid("bulk2-good-3")]
add(Case("bulk-two-bad-items", 422, json.dumps([
    {"product_id": pid("bulk2-bad-0"), "stock": True},
    {"product_id": good2[0], "price": 1},
    {"product_id": pid("bulk2-bad-2"), "price": -5},
    {"product_id": good2[1], "stock": 3},
]).encode(), pointers=("/0/stock", "/2/price"), absent=(*good2, pid("bulk2-bad-0"), pid("bulk2-bad-2"))))
add(Case("bulk-unknown-field", 422, json.dumps([
    {"product_id": pid("bulk3-good"), "price": 1},
    {"product_id": pid("bulk3-bad"), "price": 1, "foo": 1},
]).encode(), pointers=("/1/foo",), absent=(pid("bulk3-good"), pid("bulk3-bad"))))
add(Case("bulk-bad-id-last", 422, json.dumps(
    [{"product_id": pid(f"bulk4-{i}"), "stock": i} for i in range(50)] + [{"product_id": "..", "stock": 1}]
).encode(), pointers=("/50/product_id",), absent=(pid("bulk4-0"), pid("bulk4-49"))))
add(Case("bulk-non-object-item", 422, json.dumps([{"product_id": pid("bulk5-good"), "price": 1}, "x"]).encode(),
         pointers=("/1",), absent=(pid("bulk5-good"),)))
add(Case("bulk-too-many-items", 413, json.dumps(
    [{"product_id": pid("many"), "stock": i} for i in range(MAX_EVENTS + 1)]
).encode(), absent=(pid("many"),)))

# -- NDJSON
add(Case("ndjson-bad-line", 422, (
    f'{{"product_id": "{pid("nd-good")}", "price": 1}}\n'
    f'{{"product_id": "{pid("nd-bad")}", "stock": true}}\n'
).encode(), headers=dict(NDJSON), pointers=("/1/stock",), absent=(pid("nd-good"), pid("nd-bad"))))
add(Case("ndjson-bad-line-after-blanks", 422, (
    f'{{"product_id": "{pid("nd2-a")}", "price": 1}}\n\n\n'
    f'{{"product_id": "{pid("nd2-b")}", "price": 2}}\n   \n'
    f'{{"product_id": "{pid("nd2-c")}", "price": "two"}}\n'
).encode(), headers=dict(NDJSON), pointers=("/2/price",), absent=(pid("nd2-a"), pid("nd2-b"), pid("nd2-c"))))
add(Case("ndjson-malformed-line", 400, (
    f'{{"product_id": "{pid("nd3-good")}", "price": 1}}\n{{"product_id": \n'
).encode(), headers=dict(NDJSON), absent=(pid("nd3-good"),)))
add(Case("ndjson-array-line", 422, f'[{{"product_id": "{pid("nd4")}", "price": 1}}]\n'.encode(),
         headers=dict(NDJSON), absent=(pid("nd4"),)))
add(Case("ndjson-invalid-utf8", 400, f'{{"product_id": "{pid("nd5")}", "price": 1}}\n\xff\n'.encode("latin-1"),
         headers=dict(NDJSON), absent=(pid("nd5"),)))
add(Case("ndjson-empty", 400, b"", headers=dict(NDJSON)))
add(Case("ndjson-only-blank-lines", 400, b"\n\n  \n", headers=dict(NDJSON)))
add(Case("ndjson-too-many-lines", 413, b"".join(
    f'{{"product_id": "{pid("ndmany")}", "stock": {i}}}\n'.encode() for i in range(MAX_EVENTS + 1)
), headers=dict(NDJSON), absent=(pid("ndmany"),)))

# -- content types (415)
EV = f'{{"product_id": "{pid("ct")}", "price": 1}}'.encode()
for label, headers in [
    ("ct-missing", {}),
    ("ct-text-plain", {"Content-Type": "text/plain"}),
    ("ct-form", {"Content-Type": "application/x-www-form-urlencoded"}),
    ("ct-multipart", {"Content-Type": "multipart/form-data; boundary=xyz"}),
    ("ct-xml", {"Content-Type": "application/xml"}),
    ("ct-text-json", {"Content-Type": "text/json"}),
    ("ct-jsonx", {"Content-Type": "application/jsonx"}),
    ("ct-json-latin1", {"Content-Type": "application/json; charset=latin-1"}),
    ("ct-garbage", {"Content-Type": "/;;;=="}),
]:
    add(Case(label, 415, EV, headers=headers, absent=(pid("ct"),)))
add(Case("ct-form-encoded-body", 415, f"product_id={pid('form')}&price=1".encode(),
         headers={"Content-Type": "application/x-www-form-urlencoded"}, absent=(pid("form"),)))

# -- huge bodies (413)
big_event = f'{{"product_id": "{pid("huge")}", "price": 1, "pad": "'.encode()
add(Case("huge-body-content-length", 413, big_event + b"x" * (MAX_BODY + 1) + b'"}', absent=(pid("huge"),)))
add(Case("huge-body-chunked", 413, chunks=lambda: (
    [big_event] + [b"x" * 65536] * (MAX_BODY // 65536 + 2) + [b'"}']
), absent=(pid("huge"),)))
add(Case("huge-ndjson-chunked", 413, headers=dict(NDJSON), chunks=lambda: (
    [f'{{"product_id": "{pid("hugend")}", "stock": 1}}\n'.encode() * 1000] * (MAX_BODY // 40_000 + 2)
), absent=(pid("hugend"),)))
add(Case("content-length-lie", 413, b"{}", headers={**JSON, "Content-Length": str(MAX_BODY * 10)}))

# -- methods (405) and paths (404 / 400)
for method, path in [("PUT", "/events"), ("DELETE", "/events"), ("GET", "/events"), ("PATCH", "/events"),
                     ("POST", f"/products/{pid('m')}"), ("DELETE", "/products"),
                     ("POST", "/healthz"), ("PUT", "/readyz")]:
    add(Case(f"method-{method}-{path.split('/')[1]}", 405, None, headers={}, method=method, path=path))
for label, path, status in [
    ("path-root", "/", 404),
    ("path-events-slash", "/events/", 404),
    ("path-events-x", "/events/x", 404),
    ("path-products-deep", f"/products/{pid('a')}/b", 404),
    ("path-unknown", "/admin", 404),
    ("path-dotdot", "/products/..", 400),
    ("path-dot", "/products/.", 400),
    ("path-encoded-nul", "/products/a%00b", 400),
    ("path-encoded-newline", "/products/a%0Ab", 400),
    ("path-encoded-space", "/products/a%20b", 400),
    ("path-non-ascii", "/products/%C3%BC", 400),
    ("path-invalid-utf8", "/products/%FF%FE", 400),
    ("path-129", "/products/" + "a" * 129, 400),
    ("path-encoded-slash", "/products/a%2Fb", (400, 404)),
    ("path-traversal", "/products/../healthz", (400, 404)),
]:
    add(Case(label, status, None, headers={}, method="GET", path=path))

assert len(CASES) >= 60, len(CASES)


@pytest.fixture(scope="module")
def before(service):
    """What the service looked like before the table: its processes and a known product."""
    return {"shards": service.shard_pids(), "workers": service.worker_pids()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_request(service, before, case: Case):
    chunks = case.chunks() if callable(case.chunks) else case.chunks
    resp = raw_request(
        service.port, case.method, case.path,
        body=chunks if chunks is not None else case.body,
        headers=case.headers, chunked=chunks is not None, timeout=30,
    )
    status = resp[0]
    expected = case.status if isinstance(case.status, tuple) else (case.status,)
    assert status < 500, f"{case.name}: 5xx {status} {resp[2][:500]!r}"
    assert status in expected, f"{case.name}: expected {expected}, got {status}: {resp[2][:500]!r}"
    problem = assert_problem(resp, status)
    got = pointers(problem)
    for ptr in case.pointers:
        assert ptr in got, f"{case.name}: pointer {ptr!r} not in {sorted(got)}: {problem}"
    if status == 405:
        assert resp[1].get("allow"), f"{case.name}: 405 without Allow: {resp[1]}"
    for product in case.absent:
        r = service.get(product)
        assert r.status_code == 404, f"{case.name}: {product} was applied although the request was refused: {r.text}"


def test_service_still_healthy_after_hostile_table(service, before):
    product = uid("after")
    r = service.post([{"product_id": product, "price": 2.5}, {"product_id": product, "stock": 9, "version": 4}])
    assert r.status_code == 202, r.text
    body = service.product(product)
    assert (body["price"], body["stock"], body["version"]) == (2.5, 9, 4)
    ready = requests.get(service.url + "/readyz", timeout=TIMEOUT)
    assert ready.status_code == 200, ready.text
    assert service.shard_pids() == before["shards"] == service.initial_shard_pids, "a shard process died"
    assert all(s["restarts"] == 0 for s in ready.json()["shards"]), ready.text
    assert service.worker_pids() == before["workers"], "a gunicorn worker died or was replaced"
