"""Catalogue request bodies: the field rules of a product, checked whole before anything is sent.

Every bad field is named by a JSON pointer in one 422, as for events. What needs the stored
product (is it there, does its version or ETag allow the write) is the owning shard's to decide
(productd.store.catalogue).
"""

from __future__ import annotations

import os
import re
import time
import unicodedata
from urllib.parse import urlsplit

from productd.http.problems import Problem
from productd.http.validation import (
    PRODUCT_ID_RULE,
    check_int64,
    check_price,
    escape_pointer,
    json_type,
    valid_product_id,
)

MAX_NAME = 200
MAX_DESCRIPTION = 5000
MAX_IMAGES = 10
MAX_URL = 2048
FIELDS = frozenset(("product_id", "user_id", "name", "description", "images", "price", "stock", "version"))
# What a PUT replaces (and a create sets); the rest (version, timestamps) it keeps.
REPLACED = ("user_id", "name", "description", "images", "price", "stock")

CREATE, PUT, PATCH = "create", "put", "patch"


def product_fields(doc: object, mode: str, path_id: str | None = None) -> dict:
    """The fields of a create, a PUT (every replaced field, None where left out) or a merge patch
    (only the fields given, None clearing one); raises a 422 Problem naming every bad field."""
    if type(doc) is not dict:
        raise Problem(422, "Invalid product", f"the body must be a JSON object, not {json_type(doc)}",
                      kind="invalid-product", errors=[{"pointer": "", "detail": "must be an object"}])
    errors: list[dict] = []
    for name in sorted(doc.keys() - FIELDS):
        errors.append({"pointer": f"/{escape_pointer(name)}", "detail": "unknown field"})
    fields: dict = {}
    if "product_id" in doc:
        product_id = doc["product_id"]
        if not valid_product_id(product_id):
            errors.append({"pointer": "/product_id", "detail": f"must be a string of {PRODUCT_ID_RULE}"})
        elif path_id is not None and product_id != path_id:
            errors.append({"pointer": "/product_id", "detail": f"must be the id in the path ({path_id!r}) or left out"})
        else:
            fields["product_id"] = product_id
    for name in ("user_id", "name"):
        if mode != PATCH and name not in doc:
            errors.append({"pointer": f"/{name}", "detail": "is required"})
    for name, value in doc.items():
        if name not in FIELDS or name == "product_id":
            continue
        pointer = f"/{name}"
        if value is None and name not in ("user_id", "name", "version"):
            fields[name] = None  # cleared (a PUT clears what it leaves out the same way)
            continue
        check = _CHECKS[name]
        before = len(errors)
        checked = check(value, pointer, errors)
        if len(errors) == before:
            fields[name] = checked
    if errors:
        raise Problem(422, "Invalid product", f"{len(errors)} problem(s) with the product; nothing was changed",
                      kind="invalid-product", errors=errors[:100])
    if mode != PATCH:
        for name in REPLACED:
            fields.setdefault(name, None)
    return fields


def _id(value: object, pointer: str, errors: list[dict]) -> str | None:
    if not valid_product_id(value):
        errors.append({"pointer": pointer, "detail": f"must be a string of {PRODUCT_ID_RULE}"})
    return value


def _text(limit: int, low: int, allowed: str):
    def check(value: object, pointer: str, errors: list[dict]) -> str | None:
        if type(value) is not str:
            errors.append({"pointer": pointer, "detail": f"must be a string, not {json_type(value)}"})
        elif not low <= len(value) <= limit:
            errors.append({"pointer": pointer, "detail": f"must be {low} to {limit} characters, not {len(value)}"})
        elif any(unicodedata.category(c) in ("Cc", "Cs") and c not in allowed for c in value):
            errors.append({"pointer": pointer, "detail": "must not hold control characters"
                           + (" (other than newline and tab)" if allowed else "")})
        return value
    return check


def _images(value: object, pointer: str, errors: list[dict]) -> tuple | None:
    if type(value) is not list:
        errors.append({"pointer": pointer, "detail": f"must be an array of URLs, not {json_type(value)}"})
        return None
    if len(value) > MAX_IMAGES:
        errors.append({"pointer": pointer, "detail": f"holds {len(value)} URLs; at most {MAX_IMAGES}"})
        return None
    seen = set()
    for index, url in enumerate(value):
        problem = url_problem(url)
        if problem is None and url in seen:
            problem = "is already in the list"
        if problem:
            errors.append({"pointer": f"{pointer}/{index}", "detail": problem})
        seen.add(url if type(url) is str else None)
    return tuple(value)


def url_problem(url: object) -> str | None:
    """Why `url` is not an absolute http(s) URL we take, or None."""
    if type(url) is not str:
        return f"must be a URL string, not {json_type(url)}"
    if len(url) > MAX_URL:
        return f"is {len(url)} characters; at most {MAX_URL}"
    if not _URI.fullmatch(url) or url.count("#") > 1:
        return "must be a URI (RFC 3986): ASCII letters, digits and -._~:/?#[]@!$&'()*+,;= only, a '%' only " \
               "before two hex digits, at most one '#' (percent-encode the rest)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must be an absolute http:// or https:// URL"
    if not parts.hostname:
        return "must name a host"
    return None


_CHECKS = {
    "user_id": _id,
    "name": _text(MAX_NAME, 1, ""),
    "description": _text(MAX_DESCRIPTION, 0, "\n\t\r"),
    "images": _images,
    "price": check_price,
    "stock": check_int64,
    "version": check_int64,
}

# The characters of a URI (RFC 3986, section 2): unreserved, reserved, and percent-encoded octets.
_URI = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_product_id() -> str:
    """A ULID: 48 bits of milliseconds then 80 random bits, 26 characters of Crockford base32,
    so ids made later sort later (within a millisecond, in no order)."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))
