"""The lock-free slot table: fixed-size session records in a shared segment.

Slots are partitioned among workers (worker i owns a contiguous range), so every slot has
exactly one writer; readers (tcpcopyctl, a respawned worker) read any slot at any time.
"""
from __future__ import annotations

import struct

from shm import seqlock
from shm.segment import Segment


class SlotTable:
    """The session table: fixed-size slots in the segment, each written by one worker under a
    sequence counter and read by anyone without locks."""

    def __init__(self, seg: Segment, layout: struct.Struct) -> None:
        if layout.size + 4 > seg.slot_size:
            raise ValueError(f"slot layout of {layout.size} bytes exceeds {seg.slot_size}")
        self.seg = seg
        self.layout = layout
        self.empty = layout.unpack(bytes(layout.size))   # the all-zero record: a free slot

    def owned_range(self, worker: int) -> range:
        """The slots worker ``worker`` of ``n_workers`` may write."""
        n, w = self.seg.n_slots, self.seg.n_workers
        return range(worker * n // w, (worker + 1) * n // w)

    def write(self, slot: int, values: tuple) -> None:
        seqlock.write(self.seg.mm, self.seg.slot_offset(slot), self.layout, values)

    def clear(self, slot: int) -> None:
        self.write(slot, self.empty)

    def read(self, slot: int) -> tuple:
        return seqlock.read(self.seg.mm, self.seg.slot_offset(slot), self.layout)

