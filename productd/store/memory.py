"""The in-memory map of one shard: product id -> packed record. Only its shard touches it."""

from __future__ import annotations

import msgpack

from productd.store.record import CORE_SIZE, merge


class ShardStore:
    """Products owned by one shard. Not thread-safe by design: one actor owns it."""

    def __init__(self) -> None:
        self._records: dict[str, bytes] = {}
        # user_id -> ids of that owner's products (productd.store.listing): kept by `put`, the one
        # way a product's details change (catalogue writes, loading, recovery). `apply` (events)
        # keeps the details tail as it is, so it never touches this.
        self._by_user: dict[str, set[str]] = {}

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
        records = self._records
        old = records.get(product_id)
        old_user = None if old is None or len(old) == CORE_SIZE else _owner(old)
        if packed is None:
            records.pop(product_id, None)
            new_user = None
        else:
            records[product_id] = packed
            new_user = None if len(packed) == CORE_SIZE else _owner(packed)
        if old_user != new_user:
            by_user = self._by_user
            if old_user is not None:
                ids = by_user.get(old_user)
                if ids is not None:
                    ids.discard(product_id)
                    if not ids:
                        del by_user[old_user]
            if new_user is not None:
                by_user.setdefault(new_user, set()).add(product_id)

    load = put

    def items(self):
        """(product id, packed record) of every product, in no particular order."""
        return self._records.items()

    def owned_by(self, user_id: str) -> set[str]:
        """Ids of the products whose user_id is `user_id` (do not change the set)."""
        return self._by_user.get(user_id, _NONE)


_NONE: frozenset = frozenset()


def _owner(packed: bytes) -> str:
    """The user_id of a catalogued record: the first item of its details tail, read alone."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(packed[CORE_SIZE:CORE_SIZE + 200])  # the array header and a user_id of <= 128 ASCII chars
    unpacker.read_array_header()
    return unpacker.unpack()
