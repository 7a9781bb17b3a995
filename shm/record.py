"""Binary records declared once, as a table of ``(name, format)`` fields (dpkt's ``__hdr__``
idea): the struct, the size, each field's offset, packing and unpacking into a named tuple
all derive from the table, so a field's name, format and place cannot drift apart.

A field's format is one ``struct`` code with an optional count: ``"I"``, ``"20s"`` (one
bytes value), ``"40Q"`` (a tuple of 40 numbers), ``"x"``/``"3x"`` (padding: no value).
Records are packed without alignment (``<`` little-endian for shm, ``!`` network order for
the wire), so offsets are plain sums of the field sizes.
"""
from __future__ import annotations

import struct
from collections import namedtuple
from collections.abc import Sequence
from typing import Any


class Record:
    """One binary record type, declared once as its fields: struct, size, offsets and a named tuple
    derive from them."""

    def __init__(self, name: str, fields: Sequence[tuple[str, str]], order: str = "<") -> None:
        if order not in "<>!":
            raise ValueError("records are packed: byte order '<', '>' or '!'")
        self.name = name
        self.fields = tuple(fields)
        self.struct = struct.Struct(order + "".join(fmt for _, fmt in self.fields))
        self.size = self.struct.size
        self.offsets: dict[str, int] = {}
        # (name, how many struct items, whether they form a tuple) of the valued fields
        self._spans: list[tuple[str, int, bool]] = []
        offset = 0
        for fname, fmt in self.fields:
            part = struct.Struct(order + fmt)
            count = len(part.unpack(bytes(part.size)))
            self.offsets[fname] = offset
            offset += part.size
            if count:
                # "40Q" is a tuple of numbers; "20s" is one bytes value
                grouped = fmt[:-1].isdigit() and fmt[-1] not in "sp"
                self._spans.append((fname, count, grouped))
        self.names = tuple(n for n, _, _ in self._spans)
        self.flat = all(count == 1 and not grouped for _, count, grouped in self._spans)
        self.tuple = namedtuple(name, self.names)  # type: ignore[misc]

    def offset(self, field: str) -> int:
        return self.offsets[field]

    def _flatten(self, values: Sequence[Any]) -> list[Any]:
        out: list[Any] = []
        for (_, _, grouped), v in zip(self._spans, values, strict=True):
            if grouped:
                out.extend(v)
            else:
                out.append(v)
        return out

    def _group(self, items: tuple) -> tuple:
        if self.flat:
            return self.tuple._make(items)
        out, i = [], 0
        for _, count, grouped in self._spans:
            out.append(items[i:i + count] if grouped else items[i])
            i += count
        return self.tuple._make(out)

    def pack(self, *values: Any, **named: Any) -> bytes:
        """Positional values in field order, or every field by name."""
        if named:
            values = tuple(named[n] for n in self.names)
        return self.struct.pack(*(values if self.flat else self._flatten(values)))

    def pack_into(self, buf: Any, offset: int, *values: Any) -> None:
        self.struct.pack_into(buf, offset, *(values if self.flat else self._flatten(values)))

    def unpack(self, data: Any) -> tuple:
        """A named tuple of the record's fields (array fields as tuples)."""
        return self._group(self.struct.unpack(data))

    def unpack_from(self, buf: Any, offset: int = 0) -> tuple:
        return self._group(self.struct.unpack_from(buf, offset))

    def empty(self) -> tuple:
        """The all-zero record."""
        return self.unpack(bytes(self.size))
