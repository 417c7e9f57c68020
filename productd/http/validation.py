"""Turning a request body into events, or into a precise list of what is wrong with it.

A request is validated whole before anything is queued: one bad item rejects the request and
every bad item is named by a JSON pointer.
"""

from __future__ import annotations

import json
import math
import re

import orjson

from productd.config import OPTION
from productd.http.problems import Problem

INT64_MAX = 2**63 - 1
FIELDS = frozenset(("product_id", "price", "stock", "version"))
PRODUCT_ID = re.compile(r"[A-Za-z0-9._~:@-]{1,128}")
PRODUCT_ID_RULE = "1 to 128 characters, each a letter, digit or one of -._~:@, and not '.' or '..'"
MAX_REPORTED_ERRORS = 100
DEFAULT_MAX_EVENTS: int = OPTION["max-events"].default

Event = tuple  # (product_id, price | None, stock | None, version | None)


def valid_product_id(value: object) -> bool:
    return type(value) is str and PRODUCT_ID.fullmatch(value) is not None and value not in (".", "..")


def parse_json(body: bytes, pointer: str = "") -> object:
    """Parse JSON, telling malformed input (400) from valid JSON whose numbers we cannot hold."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        fast_error = str(exc)
    # orjson refuses some valid JSON (1e400, lone surrogates): let the standard library decide
    # whether the text is JSON at all, so that such values get a 422 naming the field.
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise _malformed(pointer, f"body is not valid UTF-8 (byte {exc.start})") from None
    except (ValueError, RecursionError):
        raise _malformed(pointer, f"body is not valid JSON: {fast_error}") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _malformed(pointer: str, detail: str) -> Problem:
    if pointer:
        detail = f"{pointer}: {detail}"
        return Problem(400, "Malformed request body", detail, errors=[{"pointer": pointer, "detail": detail}])
    return Problem(400, "Malformed request body", detail)


def too_many(count: int, max_events: int) -> Problem:
    return Problem(
        413, "Too many events",
        f"{count} events in one request; at most {max_events} are taken (--max-events)",
        kind="too-many-events",
    )


def events_from_json(body: bytes, max_events: int = DEFAULT_MAX_EVENTS) -> list[Event]:
    doc = parse_json(body)
    if isinstance(doc, list):
        if not doc:
            raise Problem(400, "Malformed request body", "the array holds no events")
        if len(doc) > max_events:
            raise too_many(len(doc), max_events)
        return validate_items(doc, "")
    if isinstance(doc, dict):
        errors: list[dict] = []
        event = validate_event(doc, "", errors)
        if errors:
            raise invalid(errors, 1)
        return [event]
    raise Problem(
        422, "Invalid events", "the body must be an event object or an array of event objects",
        errors=[{"pointer": "", "detail": "must be an object or an array of objects"}],
    )


def events_from_ndjson(body: bytes, max_events: int = DEFAULT_MAX_EVENTS) -> list[Event]:
    lines = [line for line in (raw.strip(b" \t\r") for raw in body.split(b"\n")) if line]
    if len(lines) > max_events:
        raise too_many(len(lines), max_events)
    docs = [parse_json(line, f"/{index}") for index, line in enumerate(lines)]
    if not docs:
        raise Problem(400, "Malformed request body", "the body holds no events")
    return validate_items(docs, "")


def validate_items(items: list, prefix: str) -> list[Event]:
    errors: list[dict] = []
    events = []
    bad = 0
    for index, item in enumerate(items):
        before = len(errors)
        events.append(validate_event(item, f"{prefix}/{index}", errors))
        if len(errors) > before:
            bad += 1
    if errors:
        raise invalid(errors, bad)
    return events


def invalid(errors: list[dict], bad_items: int) -> Problem:
    shown = errors[:MAX_REPORTED_ERRORS]
    detail = f"{bad_items} invalid event(s); nothing was queued"
    if len(errors) > len(shown):
        detail += f" (first {len(shown)} of {len(errors)} problems listed)"
    return Problem(422, "Invalid events", detail, errors=shown)


def validate_event(item: object, pointer: str, errors: list[dict]) -> Event | None:
    if type(item) is not dict:
        errors.append({"pointer": pointer, "detail": "must be an event object"})
        return None
    for name in item.keys() - FIELDS:
        errors.append({"pointer": f"{pointer}/{escape_pointer(name)}", "detail": "unknown field"})
    product_id = item.get("product_id")
    if "product_id" not in item:
        errors.append({"pointer": f"{pointer}/product_id", "detail": "is required"})
    elif not valid_product_id(product_id):
        errors.append({"pointer": f"{pointer}/product_id", "detail": f"must be a string of {PRODUCT_ID_RULE}"})
    price = item.get("price")
    if price is not None or "price" in item:
        price = check_price(price, f"{pointer}/price", errors)
    stock = item.get("stock")
    if stock is not None or "stock" in item:
        stock = check_int64(stock, f"{pointer}/stock", errors)
    version = item.get("version")
    if version is not None:
        version = check_int64(version, f"{pointer}/version", errors)
    if "price" not in item and "stock" not in item:
        errors.append({"pointer": pointer, "detail": "needs price, stock or both"})
    return (product_id, price, stock, version)


def check_price(value: object, pointer: str, errors: list[dict]) -> float | None:
    kind = type(value)
    if kind is int:
        if value < 0:
            errors.append({"pointer": pointer, "detail": "must be >= 0"})
            return None
        try:
            return float(value)
        except OverflowError:
            errors.append({"pointer": pointer, "detail": "is too large"})
            return None
    if kind is float:
        if not math.isfinite(value):
            errors.append({"pointer": pointer, "detail": "must be a finite number"})
        elif value < 0:
            errors.append({"pointer": pointer, "detail": "must be >= 0"})
        else:
            return value + 0.0  # -0.0 becomes 0.0
        return None
    errors.append({"pointer": pointer, "detail": f"must be a number, not {json_type(value)}"})
    return None


def check_int64(value: object, pointer: str, errors: list[dict]) -> int | None:
    # JSON has one number type and JSON Schema calls 5.0 an integer; generated clients send it.
    # A float is exact only up to 2**53, so larger ones are refused rather than rounded.
    if type(value) is float and value.is_integer() and abs(value) <= 2**53:
        value = int(value)
    if type(value) is not int:
        errors.append({"pointer": pointer, "detail": f"must be an integer, not {json_type(value)}"})
        return None
    if not 0 <= value <= INT64_MAX:
        errors.append({"pointer": pointer, "detail": f"must be between 0 and {INT64_MAX}"})
        return None
    return value


def json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return "a number with a fraction or exponent" if math.isfinite(value) else "an infinite number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def escape_pointer(name: str) -> str:
    """RFC 6901 escaping of one pointer segment."""
    return name.replace("~", "~0").replace("/", "~1")
