"""The data directory: which shard files hold the products, and who may use them.

    DATA_DIR/
      productd.json          {"format": 1, "shards": 4, "layout": "layout-1-4"}: the one truth
      productd.lock          flock()ed by the running supervisor; holds its pid
      layout-1-4/shard-000.sqlite3 ...

A reshard writes a complete new layout into `layout-<gen>-<n>.tmp`, renames it into place and
only then switches productd.json to it (an atomic rename). A crash before the switch leaves the
old layout in charge and a `.tmp` directory that the next start removes; nothing else in the
directory is ever deleted or overwritten to get started.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable

from productd.store import recovery, reshard_history
from productd.store.sqlite import ShardFile, StoreFileError

FORMAT = 1
META = "productd.json"
LOCK = "productd.lock"
RESHARD_CHUNK = 50_000

log = logging.getLogger("productd.datadir")


class DataDirError(Exception):
    """The data directory cannot be used; the message names the path and says why."""


class DataDir:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Create the directory if needed and take it for this process (and its children)."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise DataDirError(f"data dir {self.path} exists and is not a directory")
        try:
            os.makedirs(self.path, exist_ok=True)
            fd = os.open(os.path.join(self.path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DataDirError(f"cannot use data dir {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirError(
                f"data dir {self.path} is in use by another productd (pid {holder}); "
                "stop it or give this one another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def read_meta(self) -> dict | None:
        path = os.path.join(self.path, META)
        try:
            with open(path, "rb") as f:
                meta = json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise DataDirError(f"{path} cannot be read: {exc}; restore it from a backup") from exc
        if not isinstance(meta, dict) or not isinstance(meta.get("format"), int):
            raise DataDirError(f"{path} is not a productd metadata file")
        if meta["format"] > FORMAT:
            raise DataDirError(
                f"{path} is format {meta['format']}, written by a newer productd (this one reads format {FORMAT})"
            )
        if not isinstance(meta.get("shards"), int) or not isinstance(meta.get("layout"), str):
            raise DataDirError(f"{path} is missing its shard count or layout; restore it from a backup")
        return meta

    def write_meta(self, shards: int, layout: str) -> None:
        path = os.path.join(self.path, META)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"format": FORMAT, "shards": shards, "layout": layout}, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.path)

    def shard_path(self, layout: str, shard: int) -> str:
        return os.path.join(self.path, layout, f"shard-{shard:03d}.sqlite3")

    def prepare(
        self,
        requested: int | None,
        default: int,
        reshard: bool,
        route: Callable[[str, int], int],
    ) -> tuple[str, int]:
        """Decide the layout and shard count to serve from; move products if resharding."""
        self._remove_unfinished()
        meta = self.read_meta()
        if meta is None:
            shards = requested or default
            layout = f"layout-1-{shards}"
            os.makedirs(os.path.join(self.path, layout), exist_ok=True)
            self.write_meta(shards, layout)
            log.info("new data dir %s with %d shards", self.path, shards)
            return layout, shards
        layout, recorded = meta["layout"], meta["shards"]
        self._check_layout(layout, recorded)
        if requested is None or requested == recorded:
            return layout, recorded
        if not reshard:
            raise DataDirError(
                f"data dir {self.path} holds {recorded} shards and --shards asks for {requested}; "
                f"start with --shards {recorded}, or add --reshard to move every product to {requested} shards"
            )
        for shard in range(recorded):
            pending = recovery.path_for(self.shard_path(layout, shard))
            if recovery.read(pending):
                raise DataDirError(
                    f"{pending} holds changes a stop could not commit; start once with --shards {recorded} "
                    "so that they are committed, then reshard"
                )
        return self._reshard(layout, recorded, requested, route), requested

    def _check_layout(self, layout: str, shards: int) -> None:
        for shard in range(shards):
            path = self.shard_path(layout, shard)
            if not os.path.exists(path) and os.listdir(os.path.join(self.path, layout)):
                raise DataDirError(f"{path} is missing; restore it from a backup (its products would be lost)")

    def _reshard(self, old_layout: str, old: int, new: int, route: Callable[[str, int], int]) -> str:
        generation = int(old_layout.split("-")[1]) + 1
        layout = f"layout-{generation}-{new}"
        tmp = os.path.join(self.path, layout + ".tmp")
        os.makedirs(tmp)
        log.info("resharding %s from %d to %d shards", self.path, old, new)
        targets = [ShardFile(os.path.join(tmp, f"shard-{s:03d}.sqlite3"), sync=True) for s in range(new)]
        moved = 0
        histories, owners, covered = [], [], []
        for shard in range(old):
            path = self.shard_path(old_layout, shard)
            if not os.path.exists(path):
                histories.append([])
                owners.append({})
                covered.append(reshard_history.old_shard([], 0))
                continue
            source = ShardFile(path, sync=False)
            history, owned = source.changes(1 << 62)
            histories.append(history)
            owners.append(owned)
            covered.append(reshard_history.old_shard(history, source.max_revision()))
            buckets: list[list] = [[] for _ in range(new)]
            for product_id, packed in source.rows():
                buckets[route(product_id, new)].append((product_id, packed))
                moved += 1
                if moved % RESHARD_CHUNK == 0:
                    _flush(targets, buckets)
                    log.info("resharding: %d products moved", moved)
            _flush(targets, buckets)
            source.close()
        base = max((o.head for o in covered), default=0)
        carried = reshard_history.carry(histories, owners, base, new, route)
        for target, part in zip(targets, carried, strict=True):
            for at in range(0, len(part.changes), RESHARD_CHUNK):
                target.save([], part.changes[at:at + RESHARD_CHUNK], owners=part.owners)
            target.save_origins(reshard_history.Origins(covered, part.origins, part.end).pack())
            target.close()
        log.info("resharding: %d changes of history carried", sum(len(part.origins) for part in carried))
        _fsync_dir(tmp)
        final = os.path.join(self.path, layout)
        os.rename(tmp, final)
        _fsync_dir(self.path)
        self.write_meta(new, layout)  # the switch: from here on the new layout is the truth
        shutil.rmtree(os.path.join(self.path, old_layout))
        log.info("resharded %d products from %d to %d shards", moved, old, new)
        return layout

    def _remove_unfinished(self) -> None:
        for name in os.listdir(self.path):
            if name.startswith("layout-") and name.endswith(".tmp"):
                log.warning("removing %s, left by a reshard that did not finish", name)
                shutil.rmtree(os.path.join(self.path, name))


def _flush(targets: list[ShardFile], buckets: list[list]) -> None:
    for target, bucket in zip(targets, buckets, strict=True):
        if bucket:
            target.save(bucket)
            bucket.clear()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["DataDir", "DataDirError", "StoreFileError"]
