"""A shard's change history: every change it applies, numbered in the order it applied them.

The sequence number of a product's last change is also its revision (its ETag): one counter per
shard, never reused, so a revision names one state of one product for good. The history keeps
the last `keep` changes (`--change-history`), for the change feed; with durability on, the
shard commits each change with the products it changed.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque

from productd.store.record import CORE_SIZE, details


class ChangeLog:
    """Owned by one shard. `head` is the sequence number of the last change applied."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.head = 0
        self.entries: deque[tuple[int, str, bytes | None]] = deque(maxlen=keep)  # (seq, product id, record)
        self.unsaved: list[tuple[int, str, bytes | None]] = []  # applied since the last commit
        self.voids: list[tuple[int, int]] = []  # (low, high): cursors strictly between are lost
        self.owners: dict[int, str] = {}  # seq of a delete -> the user_id of what it deleted (feed filter)

    def append(self, seq: int, product_id: str, packed: bytes | None) -> None:
        """Record a change; `seq` is head + 1, which the caller stamped into the record first.
        `packed` is the product after the change, None for a delete."""
        entry = (seq, product_id, packed)
        self.head = seq
        self.entries.append(entry)
        self.unsaved.append(entry)

    def load(self, rows, max_revision: int, owners: dict[int, str] | None = None) -> None:
        """Start from what the shard file holds: its last changes (oldest first), the owners of
        what its deletes deleted, and the highest revision of any product (a reshard brings
        revisions from other shards)."""
        for entry in rows:
            self.entries.append(entry)
        self.owners.update(owners or {})
        last = self.entries[-1][0] if self.entries else 0
        self.head = max(last, max_revision)

    def saved(self) -> None:
        self.unsaved.clear()

    # ---- the change feed (GET /changes): what a subscriber after `after` gets

    def oldest(self) -> int:
        """The oldest cursor this history can serve: every change after it is kept."""
        entries = self.entries
        return entries[0][0] - 1 if entries else self.head

    def void_at(self, after: int) -> bool:
        """Is `after` inside a range of sequence numbers a crash may have handed out and lost
        (`void`)? A subscriber there saw changes this shard no longer has."""
        return any(low < after < high for low, high in self.voids)

    def void(self, gap: int) -> tuple[int, str, bytes]:
        """Start a new life: jump `head` by `gap` over the numbers the last one may have used
        without committing them, and record the range as a marker entry (product id "", its
        record the last number before the range), which is saved and loaded like any change.
        Also finds the voids of earlier lives among the loaded entries."""
        self.voids = [(bytes_to_int(packed), seq) for seq, product_id, packed in self.entries if product_id == VOID]
        low = self.head
        self.head = low + gap
        marker = (self.head, VOID, int_to_bytes(low))
        self.entries.append(marker)
        self.unsaved.append(marker)
        if gap > 0:
            self.voids.append((low, self.head))
        return marker

    def forget(self) -> None:
        """Drop the whole history (the products changed in ways it does not hold)."""
        self.entries.clear()

    def since(self, after: int, limit: int, user_id: str | None, ids: frozenset | None, scan: int):
        """What a subscriber whose cursor is `after` gets: (status, scanned_to, changes).

        status OK: `changes` are the first `limit` changes after `after` that pass the filters
        (owner `user_id`, product ids `ids`), as (seq, product id, record or None), oldest first;
        `scanned_to` is the seq up to which the history was looked at (at most `scan` entries),
        the subscriber's cursor for this shard afterwards. EXPIRED: older than the history.
        LOST: inside a void or ahead of `head` (a life of this shard whose changes are gone).
        """
        head = self.head
        if after >= head:
            return (OK if after == head else LOST), after, []
        if after < self.oldest():
            return EXPIRED, after, []
        entries = self.entries
        start = bisect.bisect_right(entries, after, key=_seq)
        if self.void_at(after):
            return LOST, after, []
        left = len(entries) - start
        if left <= scan and left * 2 < len(entries):
            window = list(itertools.islice(reversed(entries), left))
            window.reverse()
        else:
            window = itertools.islice(entries, start, start + scan)
        out = []
        scanned_to = after
        for entry in window:
            seq, product_id, packed = entry
            scanned_to = seq
            if product_id == VOID:
                continue
            if ids is not None and product_id not in ids:
                continue
            if user_id is not None and owner(packed, self.owners.get(seq)) != user_id:
                continue
            out.append(entry)
            if len(out) >= limit:
                break
        return OK, scanned_to, out

    def note_delete(self, seq: int, before: bytes | None) -> None:
        """Remember whose product the delete numbered `seq` removed (for the user_id filter)."""
        if before is not None and len(before) > CORE_SIZE:
            self.owners[seq] = details(before)[0]
            if len(self.owners) > 2 * self.keep or len(self.owners) > 65536:
                oldest = self.oldest()
                for key in [key for key in self.owners if key <= oldest]:
                    del self.owners[key]


VOID = ""  # the product id of a void marker: no product has an empty id
OK, EXPIRED, LOST = 0, 1, 2


def _seq(entry) -> int:
    return entry[0]


def owner(packed: bytes | None, deleted_owner: str | None = None) -> str | None:
    """The user_id of a change's record (a delete's: what note_delete kept, if anything)."""
    if packed is None:
        return deleted_owner
    if len(packed) <= CORE_SIZE:
        return None
    return details(packed)[0]


def int_to_bytes(value: int) -> bytes:
    return value.to_bytes(8, "big", signed=True)


def bytes_to_int(data: bytes | None) -> int:
    return int.from_bytes(data, "big", signed=True) if data else 0
