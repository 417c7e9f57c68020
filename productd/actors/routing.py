"""Which shard owns a product: a hash that every process computes the same way."""

import zlib


def shard_for(product_id: str, shards: int) -> int:
    """Stable across processes and restarts (Python's hash() is salted per process)."""
    return zlib.crc32(product_id.encode()) % shards
