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
        revision: int = 0,
    ) -> bytes | None:
        """Merge one event; the new record if it changed the product, None if it was stale."""
        new = merge(self._records.get(product_id), price, stock, version, now_ns, revision)
        if new is not None:
            self._records[product_id] = new
        return new

    def get_packed(self, product_id: str) -> bytes | None:
        return self._records.get(product_id)

    def put(self, product_id: str, packed: bytes | None) -> None:
        """Store a record (None deletes the product); also what loading from disk uses."""
        if packed is None:
            self._records.pop(product_id, None)
        else:
            self._records[product_id] = packed

    load = put

    def items(self):
        """(product id, packed record) of every product, in no particular order."""
        return self._records.items()
