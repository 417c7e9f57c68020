"""The in-memory map of one shard: product id -> packed record. Only its shard touches it."""

from __future__ import annotations

from productd.store.record import merge


class ShardStore:
    """Products owned by one shard. Not thread-safe by design: one actor owns it."""

    def __init__(self) -> None:
        self._records: dict[str, bytes] = {}

    def __len__(self) -> int:
        return len(self._records)

    def apply(
        self,
        product_id: str,
        price: float | None,
        stock: int | None,
        version: int | None,
        now_ns: int,
    ) -> bool:
        """Merge one event; True if it changed the record, False if it was stale."""
        new = merge(self._records.get(product_id), price, stock, version, now_ns)
        if new is None:
            return False
        self._records[product_id] = new
        return True

    def get_packed(self, product_id: str) -> bytes | None:
        return self._records.get(product_id)

    def load(self, product_id: str, packed: bytes) -> None:
        """Put a record read back from durable storage."""
        self._records[product_id] = packed
