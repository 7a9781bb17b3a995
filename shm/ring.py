"""Single-producer single-consumer rings of fixed-size records in shared memory.

Layout of one ring: ``head`` (u64, written by the consumer only) in its own 64-byte line,
``tail`` (u64, written by the producer only) in the next, then ``capacity`` records. The
producer writes records, then publishes them by storing the new tail; the consumer reads
them, then frees them by storing the new head. x86 keeps stores in order, and each side
only ever writes its own counter, so no lock is needed. The counters are read and written
as whole aligned 8-byte words (a memoryview of unsigned 64-bit items): struct would store
them a byte at a time, and a reader could see half of an update.
"""
from __future__ import annotations

import mmap

HEADER = 128


def ring_size(capacity: int, record: int) -> int:
    return HEADER + capacity * record


class Ring:
    """One single-producer single-consumer ring of fixed-size records in shared memory."""

    def __init__(self, mm: mmap.mmap, offset: int, capacity: int, record: int) -> None:
        if capacity & (capacity - 1):
            raise ValueError("capacity must be a power of two")
        if offset % 64:
            raise ValueError("a ring must start on a 64-byte boundary")
        self.mm = mm
        self.words = memoryview(mm).cast("B").cast("Q")
        self.head = offset // 8          # index of the head word
        self.tail = offset // 8 + 8      # index of the tail word (next 64-byte line)
        self.data = offset + HEADER
        self.capacity = capacity
        self.record = record

    def push(self, records: list[bytes]) -> int:
        """Append as many records as fit; returns how many did."""
        mm, rec, cap, words = self.mm, self.record, self.capacity, self.words
        head = words[self.head]
        tail = words[self.tail]
        n = min(len(records), cap - (tail - head))
        base = self.data
        for i in range(n):
            off = base + ((tail + i) & (cap - 1)) * rec
            mm[off:off + rec] = records[i]
        if n:
            words[self.tail] = tail + n
        return n

    def pop_all(self, clear: bool = False) -> list[bytes]:
        """Every record pushed since the last pop, oldest first; with ``clear`` their slots
        are zeroed before they are handed back to the producer (records that should not
        stay readable in the segment: the comparison test's production bytes)."""
        mm, rec, cap, words = self.mm, self.record, self.capacity, self.words
        head = words[self.head]
        tail = words[self.tail]
        if tail == head:
            return []
        base = self.data
        out = []
        blank = bytes(rec) if clear else b""
        for i in range(head, tail):
            off = base + (i & (cap - 1)) * rec
            out.append(mm[off:off + rec])
            if clear:
                mm[off:off + rec] = blank
        words[self.head] = tail
        return out

    def __len__(self) -> int:
        return self.words[self.tail] - self.words[self.head]
