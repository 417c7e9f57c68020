"""Where renditions are kept: an object store addressed by the SHA-256 of each object's bytes.

`ObjectStore` is the whole interface the pipeline and the image serving use; `DirectoryStore`
is the embedded one, files under the data dir:

    <data-dir>/images/ab/cd/<sha256>.webp     (ab, cd: the first two bytes of the hash)

A key is `<sha256 hex>.<extension>`; the same bytes always get the same key, so a put of
bytes already there writes nothing, and an object never changes once written (its key is a
strong ETag and it can be cached forever). A put writes a temporary file in the target
directory, fsyncs it, renames it into place and fsyncs the directory: a crash leaves either
the whole object or none (and maybe a `.tmp-*` file, which `sweep_temporary` removes).

An S3-compatible store stands beside this one by implementing the same five methods, with
the key as the object name (a PUT of the same content is harmless there too).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Protocol

KEY = re.compile(r"([0-9a-f]{64})\.([a-z0-9]{1,8})")


class ObjectStoreError(Exception):
    pass


class ObjectStore(Protocol):
    def put(self, data: bytes, extension: str = "webp") -> str:
        """Store `data`; return its key. Idempotent."""

    def get(self, key: str) -> bytes: ...

    def open(self, key: str) -> BinaryIO:
        """A binary file positioned at 0 (seekable, for Range requests)."""

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...


def key_for(data: bytes, extension: str = "webp") -> str:
    return f"{hashlib.sha256(data).hexdigest()}.{extension}"


def check_key(key: str) -> tuple[str, str]:
    """(hex digest, extension) of a well-formed key; ValueError for anything else (e.g. `../`)."""
    match = KEY.fullmatch(key)
    if not match:
        raise ValueError(f"{key!r} is not an object key")
    return match.group(1), match.group(2)


class DirectoryStore:
    """Content-addressed files under `root` (the data dir's images/)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        digest, _ = check_key(key)
        return self.root / digest[:2] / digest[2:4] / key

    def put(self, data: bytes, extension: str = "webp") -> str:
        key = key_for(data, extension)
        path = self.path(key)
        try:
            if path.stat().st_size == len(data):
                return key  # already there: same hash, same bytes
        except FileNotFoundError:
            pass
        self._mkdirs(path.parent)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(path.parent)
        return key

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def open(self, key: str) -> BinaryIO:
        return open(self.path(key), "rb")

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def verify(self, key: str) -> bool:
        """Whether the object's bytes still hash to its key (a check for fsck-like tools)."""
        return key_for(self.get(key), check_key(key)[1]) == key

    def sweep_temporary(self, older_than: float = 3600.0) -> int:
        """Remove temporary files a crashed put left behind; returns how many."""
        removed = 0
        cutoff = time.time() - older_than
        for temporary in self.root.glob("*/*/.tmp-*"):
            try:
                if temporary.stat().st_mtime < cutoff:
                    temporary.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    def _mkdirs(self, directory: Path) -> None:
        if directory.is_dir():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        created = []
        for level in (directory.parent.parent, directory.parent, directory):
            try:
                level.mkdir()
                created.append(level)
            except FileExistsError:
                pass
        for level in created:  # make each new directory entry durable in its parent
            _fsync_dir(level.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
