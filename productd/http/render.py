"""How a product looks in every answer: the single read, multi-get, listings and the change feed."""

from __future__ import annotations

import time

from productd.store.record import DONE, unpack

_SECONDS: dict[int, str] = {}  # formatted whole seconds: products are often updated in the same second


def rfc3339(ns: int) -> str:
    seconds, rest = divmod(ns, 1_000_000_000)
    text = _SECONDS.get(seconds)
    if text is None:
        if len(_SECONDS) >= 4096:
            _SECONDS.clear()
        text = _SECONDS[seconds] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{text}.{rest // 1000:06d}Z"


def etag(revision: int) -> str:
    """The strong entity tag of a product's revision (productd.store.record)."""
    return f'"{revision}"'


def product_json(product_id: str, packed: bytes) -> dict:
    """The product document: every field, null where never set."""
    p = unpack(packed)
    return {
        "product_id": product_id,
        "user_id": p.user_id,
        "name": p.name,
        "description": p.description,
        "images": images_json(p.images, p.image_results),
        "price": p.price,
        "stock": p.stock,
        "version": p.version,
        "created_at": rfc3339(p.created_at_ns),
        "updated_at": rfc3339(p.updated_at_ns),
        "etag": etag(p.revision),
    }


def images_json(images: tuple, results: dict | None) -> list[dict]:
    """Per image: its URL and state; a done one its rendition, a failed one the reason."""
    out = []
    for url in images:
        result = results.get(url) if results else None
        if result is None:
            out.append({"url": url, "state": "pending"})
        elif result[0] == DONE:
            _, key, fmt, width, height, size = result
            out.append({"url": url, "state": "done", "rendition": {
                "url": f"/images/{key}", "format": fmt, "width": width, "height": height, "bytes": size}})
        else:
            out.append({"url": url, "state": "failed", "reason": result[1]})
    return out
