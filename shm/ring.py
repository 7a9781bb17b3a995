"""Single-producer single-consumer rings of fixed-size records in shared memory.

Layout of one ring: ``head`` (u64, written by the consumer only) in its own 64-byte line,
``tail`` (u64, written by the producer only) in the next, then ``capacity`` records. The
producer writes records, then publishes them by storing the new tail; the consumer reads
them, then frees them by storing the new head. x86 keeps stores in order, and each side
only ever writes its own counter, so no lock is needed.
"""
from __future__ import annotations

import mmap
import struct

U64 = struct.Struct("<Q")
HEADER = 128


def ring_size(capacity: int, record: int) -> int:
    return HEADER + capacity * record


class Ring:
    def __init__(self, mm: mmap.mmap, offset: int, capacity: int, record: int) -> None:
        if capacity & (capacity - 1):
            raise ValueError("capacity must be a power of two")
        self.mm = mm
        self.head_off = offset
        self.tail_off = offset + 64
        self.data = offset + HEADER
        self.capacity = capacity
        self.record = record

    def push(self, records: list[bytes]) -> int:
        """Append as many records as fit; returns how many did."""
        mm, rec, cap = self.mm, self.record, self.capacity
        head = U64.unpack_from(mm, self.head_off)[0]
        tail = U64.unpack_from(mm, self.tail_off)[0]
        n = min(len(records), cap - (tail - head))
        base = self.data
        for i in range(n):
            off = base + ((tail + i) & (cap - 1)) * rec
            mm[off:off + rec] = records[i]
        if n:
            U64.pack_into(mm, self.tail_off, tail + n)
        return n

    def pop_all(self) -> list[bytes]:
        mm, rec, cap = self.mm, self.record, self.capacity
        head = U64.unpack_from(mm, self.head_off)[0]
        tail = U64.unpack_from(mm, self.tail_off)[0]
        if tail == head:
            return []
        base = self.data
        out = []
        for i in range(head, tail):
            off = base + (i & (cap - 1)) * rec
            out.append(mm[off:off + rec])
        U64.pack_into(mm, self.head_off, tail)
        return out

    def __len__(self) -> int:
        return U64.unpack_from(self.mm, self.tail_off)[0] - U64.unpack_from(self.mm,
                                                                             self.head_off)[0]
