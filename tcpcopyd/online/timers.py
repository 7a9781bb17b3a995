"""When to look at a session again: its wake-ups on a wheel of one-millisecond buckets.

A heap of one tuple per wake-up cost ≈ 4.5 pushes and pops per short request on a heap of
thousands. Buckets of a millisecond in a dict, with a heap of their milliseconds, still
made a bucket, a dict entry and a heap entry for nearly every wake-up (time moves on between
two of them): 13 % of a worker's samples at 2 000 keep-alive requests/s. Here the buckets
are a ring of WHEEL lists made once, one per millisecond from the cursor (the first
millisecond not fired yet) on: a wake-up is appended to its millisecond's list. One further
ahead than the ring reaches waits in a heap (few: the gap and linger waits, long
retransmission timers, and every wake-up set before the first tick) and moves onto the
ring as the cursor comes within reach of it.

A wake-up never fires early (in the current millisecond, each one's own time is compared);
they fire by millisecond, in each in the order they were set (those that waited in the heap
first, by their time), and at most the tick's budget fire in one turn.
"""
from __future__ import annotations

import heapq
from typing import Final, Generic, TypeVar

T = TypeVar("T")

# milliseconds the ring reaches ahead of its cursor
WHEEL: Final = 2048
MASK: Final = WHEEL - 1
# the cursor before the first tick: every wake-up waits in the heap until then
UNSET: Final = -1
# a bit per bucket that holds wake-ups, in words of WORD bits: the first one due is found
# without a look at every millisecond in between
WORD: Final = 32


class Timers(Generic[T]):
    """Wake-ups of items (sessions), each at its own time."""
    __slots__ = ("wheel", "held", "far", "cursor", "count", "on_wheel", "earliest", "order")

    def __init__(self) -> None:
        self.wheel: list[list[tuple[float, T]]] = [[] for _ in range(WHEEL)]
        self.held = [0] * (WHEEL // WORD)   # which buckets hold wake-ups
        self.far: list[tuple[float, int, T]] = []   # heap: (time, order set, item)
        self.cursor = UNSET   # the first millisecond not fired yet
        self.count = 0        # wake-ups pending
        self.on_wheel = 0     # of which on the ring
        self.earliest = -1.0  # the earliest wake-up's time; -1.0: not known, or none
        self.order = 0        # wake-ups set into the heap so far (its tie-break)

    def __len__(self) -> int:
        return self.count

    def add(self, when: float, item: T) -> None:
        slot = int(when * 1000.0)
        cursor = self.cursor
        if cursor == UNSET or slot - cursor >= WHEEL:
            self.order += 1
            heapq.heappush(self.far, (when, self.order, item))
        else:
            # (a time already past waits in the cursor's millisecond: the next tick's)
            self._put(slot if slot > cursor else cursor, when, item)
        if self.count == 0 or 0.0 <= when < self.earliest:
            self.earliest = when
        self.count += 1

    def next(self) -> float | None:
        """The time of the earliest wake-up, None if there is none."""
        if self.count == 0:
            return None
        if self.earliest < 0.0:
            self.earliest = self._earliest()
        return self.earliest

    def _earliest(self) -> float:
        least = self.far[0][0] if self.far else float("inf")
        if self.on_wheel:
            # the first bucket that holds any (a time already past is in the cursor's)
            first = self._held_from(self.cursor, self.cursor + WHEEL - 1)
            for when, _ in self.wheel[first & MASK]:
                if when < least:
                    least = when
        return least

    def _put(self, slot: int, when: float, item: T) -> None:
        i = slot & MASK
        bucket = self.wheel[i]
        if not bucket:
            self.held[i // WORD] |= 1 << (i % WORD)
        bucket.append((when, item))
        self.on_wheel += 1

    def _held_from(self, start: int, end: int) -> int:
        """The first millisecond from ``start`` to ``end`` (less than WHEEL on) whose bucket
        holds wake-ups; ``end + 1``: none."""
        held = self.held
        k, span = 0, end - start
        while k <= span:
            i = (start + k) & MASK
            bits = held[i // WORD] >> (i % WORD)
            if bits:
                k += (bits & -bits).bit_length() - 1
                return start + k if k <= span else end + 1
            k += WORD - i % WORD
        return end + 1

    def due(self, now: float, budget: int) -> list[T]:
        """Take the wake-ups due at ``now`` (at most ``budget`` of them), in order of their
        milliseconds, and in each in the order they were set."""
        out: list[T] = []
        limit = int(now * 1000.0)
        wheel = self.wheel
        while len(out) < budget:
            if self.on_wheel == 0:
                # nothing on the ring: the cursor jumps to now, or to the heap's first
                # millisecond if that comes sooner
                far = self.far
                start = min(limit, int(far[0][0] * 1000.0)) if far else limit
                if start > self.cursor:
                    self.cursor = start
                    self._take_near()
                if self.on_wheel == 0:
                    break
            cursor = self.cursor
            if cursor > limit:
                break
            bucket = wheel[cursor & MASK]
            if not bucket:
                if cursor == limit:
                    break
                # on to the first bucket that holds any, or to now (the ring's wake-ups
                # are all within its reach: the heap's that it reaches on the way are not
                # before that bucket)
                self.cursor = min(self._held_from(cursor + 1, min(limit, cursor + WHEEL - 1)),
                                  limit)
                if self.far:
                    self._take_near()
                continue
            before = len(out)
            if cursor < limit:
                # a millisecond gone by: all of it is due
                n = min(len(bucket), budget - before)
                for k in range(n):
                    out.append(bucket[k][1])
                if n < len(bucket):
                    del bucket[:n]
                else:
                    bucket.clear()
            else:
                rest: list[tuple[float, T]] = []
                for entry in bucket:
                    if entry[0] <= now and len(out) < budget:
                        out.append(entry[1])
                    else:
                        rest.append(entry)
                wheel[cursor & MASK] = rest
            taken = len(out) - before
            self.on_wheel -= taken
            self.count -= taken
            self.earliest = -1.0
            if wheel[cursor & MASK]:
                break       # the budget, or wake-ups later in this millisecond
            i = cursor & MASK
            self.held[i // WORD] &= ~(1 << (i % WORD))
            if cursor == limit:
                break
            self.cursor = cursor + 1
            if self.far:
                self._take_near()
        return out

    def _take_near(self) -> None:
        """Move the heap's wake-ups the ring now reaches onto it (one already past: into
        the cursor's millisecond)."""
        far, cursor = self.far, self.cursor
        reach = cursor + WHEEL
        while far and int(far[0][0] * 1000.0) < reach:
            when, _order, item = heapq.heappop(far)
            slot = int(when * 1000.0)
            self._put(slot if slot > cursor else cursor, when, item)
