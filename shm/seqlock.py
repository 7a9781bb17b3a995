"""Seqlock records: single writer, readers never block and never see a torn record."""
from __future__ import annotations

import mmap
import struct

SEQ = struct.Struct("<I")
# a reader gives up after this many attempts to find the record stable
READ_ATTEMPTS = 1000


class TornRead(RuntimeError):
    """The record kept changing under the reader."""


def write(mm: mmap.mmap, offset: int, layout: struct.Struct, values: tuple) -> None:
    """Write ``values`` at ``offset`` (the record's 4-byte sequence counter comes first).

    Only the record's owner may call this. The counter is odd while the body changes.
    """
    seq = SEQ.unpack_from(mm, offset)[0]
    SEQ.pack_into(mm, offset, (seq + 1) & 0xFFFFFFFF | 1)
    layout.pack_into(mm, offset + 4, *values)
    SEQ.pack_into(mm, offset, ((seq | 1) + 1) & 0xFFFFFFFF)


def read(mm: mmap.mmap, offset: int, layout: struct.Struct) -> tuple:
    """A consistent copy of the record at ``offset``."""
    size = layout.size
    for _ in range(READ_ATTEMPTS):
        s1 = SEQ.unpack_from(mm, offset)[0]
        if s1 & 1:
            continue
        body = mm[offset + 4:offset + 4 + size]
        if SEQ.unpack_from(mm, offset)[0] == s1:
            return layout.unpack(body)
    raise TornRead(f"record at offset {offset} kept changing")
