"""When to look at a session again: its wake-ups in buckets of one millisecond.

A heap of one tuple per wake-up cost ≈ 4.5 pushes and pops per short request on a heap of
thousands (memory-bound, and as slow compiled as interpreted). Here a wake-up is appended
to the list of its millisecond, and only a millisecond's first wake-up enters the heap of
buckets: the wake-ups one loop turn sets share a few. A wake-up never fires early (in the
current millisecond, each one's own time is compared), and at most the tick's budget fire
in one turn.
"""
from __future__ import annotations

import heapq
from typing import Generic, TypeVar

T = TypeVar("T")


class Timers(Generic[T]):
    """Wake-ups of items (sessions), each at its own time."""
    __slots__ = ("buckets", "slots", "count", "earliest")

    def __init__(self) -> None:
        self.buckets: dict[int, list[tuple[float, T]]] = {}   # millisecond -> wake-ups
        self.slots: list[int] = []                            # heap of those milliseconds
        self.count = 0                                         # wake-ups pending
        # the earliest wake-up of the first millisecond (slots[0]); -1.0: not known
        self.earliest = -1.0

    def __len__(self) -> int:
        return self.count

    def add(self, when: float, item: T) -> None:
        slot = int(when * 1000.0)
        bucket = self.buckets.get(slot)
        if bucket is None:
            self.buckets[slot] = [(when, item)]
            heapq.heappush(self.slots, slot)
        else:
            bucket.append((when, item))
        self.count += 1
        if slot == self.slots[0]:
            if bucket is None:
                self.earliest = when      # a new first millisecond: its only wake-up
            elif when < self.earliest:
                self.earliest = when      # (while not known, it stays so)

    def next(self) -> float | None:
        """The time of the earliest wake-up, None if there is none."""
        if not self.slots:
            return None
        if self.earliest < 0.0:
            self.earliest = min(when for when, _ in self.buckets[self.slots[0]])
        return self.earliest

    def due(self, now: float, budget: int) -> list[T]:
        """Take the wake-ups due at ``now`` (at most ``budget`` of them), in order of their
        milliseconds, and in each in the order they were set."""
        out: list[T] = []
        slots, buckets = self.slots, self.buckets
        limit = int(now * 1000.0)
        while slots and slots[0] <= limit and len(out) < budget:
            slot = slots[0]
            bucket = buckets[slot]
            rest: list[tuple[float, T]] = []
            i, n = 0, len(bucket)
            while i < n and len(out) < budget:
                when, item = bucket[i]
                i += 1
                if when <= now:
                    out.append(item)
                else:
                    rest.append((when, item))
            if i < n:
                rest.extend(bucket[i:])
            self.count -= n - len(rest)
            self.earliest = -1.0
            if rest:
                buckets[slot] = rest
                break
            del buckets[slot]
            heapq.heappop(slots)
        return out
