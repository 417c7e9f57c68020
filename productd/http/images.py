"""`GET` and `HEAD /images/{key}`: the stored renditions, served from the object store.

An object's key is the SHA-256 of its bytes (productd.images.objects): it never changes once
written, so the hash is a strong ETag and the answer may be cached for a year (`immutable`: a
browser does not even revalidate on reload). `If-None-Match` gets 304; one `Range` gets 206
(or 416 when it starts past the end); several ranges get the whole object, 200, because a
multipart answer for a 10-200 KB image buys a client nothing a second request would not.
A `Range` in another unit than bytes is ignored (RFC 9110, 14.2); one in bytes that does not
parse is refused, 416, with a problem saying why.

A key that is not a key (`..`, a wrong length, capitals, another character) is 404 before the
store is touched: `check_key` is the only way to a path, so nothing outside the store is reachable.
"""

from __future__ import annotations

import asyncio
import re

import falcon

from productd.http.problems import Problem
from productd.images.objects import DirectoryStore, check_key

CACHE_CONTROL = "public, max-age=31536000, immutable"
CONTENT_TYPES = {"webp": "image/webp", "avif": "image/avif", "png": "image/png", "jpeg": "image/jpeg",
                 "jpg": "image/jpeg", "gif": "image/gif"}
_BYTE_RANGE = re.compile(r"(\d{0,18})-(\d{0,18})")
_MAX_RANGES_SHOWN = 64


class Images:
    def __init__(self, store: DirectoryStore) -> None:
        self.store = store

    async def on_get(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        try:
            digest, extension = check_key(key)
        except ValueError:
            raise Problem(404, "Not found",
                          f"{key[:100]!r} is not an image key (64 lowercase hex digits, a dot and an extension)",
                          kind="not-found") from None
        try:
            size = await asyncio.to_thread(self.store.size, key)
        except FileNotFoundError:
            raise Problem(404, "Not found", f"no stored image {key}", kind="not-found") from None
        not_modified = _matches(req.get_header("If-None-Match"), digest)
        # Checked before any header is set: a 416 problem must not carry the image's year of caching.
        span = None if not_modified else _range(req, digest, size)
        resp.set_header("ETag", f'"{digest}"')
        resp.cache_control = [CACHE_CONTROL]
        resp.set_header("Accept-Ranges", "bytes")
        resp.set_header("X-Content-Type-Options", "nosniff")  # an image, never a page
        if not_modified:
            resp.status = falcon.HTTP_304
            return
        resp.content_type = CONTENT_TYPES.get(extension, "application/octet-stream")
        start, end = span if span is not None else (0, size - 1)
        if span is not None:
            resp.status = falcon.HTTP_206
            resp.set_header("Content-Range", f"bytes {start}-{end}/{size}")
        length = end - start + 1
        if req.method == "HEAD":
            resp.content_length = length
            return
        resp.data = await asyncio.to_thread(self._read, key, start, length)

    on_head = on_get

    def _read(self, key: str, start: int, length: int) -> bytes:
        with self.store.open(key) as f:
            f.seek(start)
            return f.read(length)


def _matches(header: str | None, digest: str) -> bool:
    """If-None-Match: `*` or a list of tags, one of them ours (weak comparison, RFC 9110 13.1.2)."""
    if not header:
        return False
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == f'"{digest}"':
            return True
    return False


def _range(req: falcon.Request, digest: str, size: int) -> tuple[int, int] | None:
    """The one byte range asked for, as (first, last) within the object; None for the whole."""
    header = req.get_header("Range")
    if not header:
        return None
    if_range = req.get_header("If-Range")
    if if_range is not None and if_range.strip() != f'"{digest}"':
        return None  # the client's copy is another object (or a date, which a key never has): all of it
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes":
        return None  # a unit we do not know: ignored, as RFC 9110 says
    parts = [p.strip() for p in spec.split(",")]
    spans = []
    for part in parts[:_MAX_RANGES_SHOWN]:
        match = _BYTE_RANGE.fullmatch(part)
        if not match or not (match.group(1) or match.group(2)):
            raise _unsatisfiable(size, f"Range {header[:100]!r}: {part[:40]!r} is not first-last, first- or -suffix")
        first, last = match.group(1), match.group(2)
        if first:
            if last and int(last) < int(first):
                raise _unsatisfiable(size, f"Range {header[:100]!r}: {part!r} ends before it starts")
            spans.append((int(first), min(int(last), size - 1) if last else size - 1))
        else:
            suffix = int(last)
            spans.append((max(0, size - suffix), size - 1) if suffix else (size, size - 1))
    satisfiable = [(a, b) for a, b in spans if a < size and a <= b]
    if not satisfiable:
        raise _unsatisfiable(size, f"Range {header[:100]!r} asks for nothing within the image's {size} bytes")
    if len(parts) > 1:
        return None  # several ranges: the whole object (see the module docstring)
    return satisfiable[0]


def _unsatisfiable(size: int, detail: str) -> Problem:
    return Problem(416, "Range not satisfiable", detail, kind="range-not-satisfiable",
                   headers={"Content-Range": f"bytes */{size}"})
