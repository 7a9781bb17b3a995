"""Client segments captured ahead of a gap (out of order), held in sequence order until the
gap fills: a heap of their distances from a fixed base (the first missing byte when the
first of them came), so adding one and taking the next cost O(log n) however many are
held, and sequence numbers may wrap. A session gets one only while it has a gap."""
from __future__ import annotations

import heapq

from tcpcopyd.net.packet import seq_diff


class OutOfOrder:
    """The segments of one session held beyond a gap, in sequence order, until the gap fills."""
    __slots__ = ("base", "heap", "segments", "cost", "bytes")

    def __init__(self, base: int, cost: int = 0) -> None:
        self.base = base                  # sequence number every distance counts from
        self.heap: list[tuple[int, int]] = []          # (distance from base, seq)
        self.segments: dict[int, tuple[int, bytes, int]] = {}   # seq -> (flags, payload, ack)
        self.cost = cost                  # what a held segment costs beyond its payload
        self.bytes = 0                    # payload + cost of what is held

    def __len__(self) -> int:
        return len(self.segments)

    def __bool__(self) -> bool:   # a compiled class ignores __len__ for truth
        return bool(self.segments)

    def add(self, seq: int, flags: int, payload: bytes, ack: int) -> bool:
        """Hold a segment; False if one with the same sequence number is held already."""
        if seq in self.segments:
            return False
        self.segments[seq] = (flags, payload, ack)
        heapq.heappush(self.heap, (seq_diff(seq, self.base), seq))
        self.bytes += len(payload) + self.cost
        return True

    def pop_ready(self, cap_nxt: int) -> tuple[int, int, bytes, int] | None:
        """The held segment that starts first, if it starts at or before ``cap_nxt`` (the
        next byte the capture needs): (seq, flags, payload, ack); None if there is none."""
        heap, limit = self.heap, seq_diff(cap_nxt, self.base)
        while heap and heap[0][0] <= limit:
            _, seq = heapq.heappop(heap)
            entry = self.segments.pop(seq, None)
            if entry is not None:
                self.bytes -= len(entry[1]) + self.cost
                return (seq, *entry)
        return None
