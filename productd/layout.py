"""Rows of 64-bit fields in shared memory, declared field by field in order.

The status board (actors/status.py) and the HTTP counters (http/stats.py) are tables of int64
rows in an mmap that several processes read and write without a lock. A `Layout` is one row:
each field is declared once, in order, with its length; offsets and the row size follow from
that, so adding a field cannot overlap another or outgrow the row.
"""

from __future__ import annotations

CACHE_LINE_FIELDS = 8  # 64 bytes: rows written by different processes never share a cache line


class Layout:
    """The fields of one row: declare them in order with `field`, then take `size()` once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fields: dict[str, tuple[int, int]] = {}  # name -> (offset, length), in order
        self._used = 0
        self._size: int | None = None

    def field(self, name: str, length: int = 1) -> int:
        """Declare the next field (`length` int64s) and return its offset in the row."""
        if self._size is not None:
            raise ValueError(f"{self.name}: field {name!r} declared after the row size was taken")
        if name in self.fields or length < 1:
            raise ValueError(f"{self.name}: field {name!r} is declared twice or has no room")
        offset = self._used
        self.fields[name] = (offset, length)
        self._used += length
        return offset

    def size(self, align: int = CACHE_LINE_FIELDS) -> int:
        """The row size in int64s: every field declared, rounded up to a whole number of `align`."""
        self._size = -(-self._used // align) * align
        assert self._used <= self._size, f"{self.name}: {self._used} fields do not fit {self._size}"
        return self._size
