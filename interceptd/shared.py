"""interceptd's part of its shm segment: a memory of the refused addresses lately logged
(so that every worker does not log the same one), then, with several workers, the route
key table (one region per worker) and a hand-off ring for every ordered pair of workers."""
from __future__ import annotations

import struct

from shm.keytable import KeyTable, buckets_for, region_size
from shm.ring import Ring, ring_size
from shm.segment import Segment
from tcpcopyd.net import wire


def ring_capacity(workers: int) -> int:
    """Records per hand-off ring: fewer with more workers (there are workers² rings), a
    power of two from 256 to 4096."""
    return max(256, min(4096, 1 << ((16384 // workers).bit_length() - 1)))


# the refused-address memory: this many entries of (address, monotonic time logged); an
# IPv4 address is kept as its 4 bytes then zeros
LOGGED_SLOTS = 256
LOGGED = struct.Struct("<16sd")
LOGGED_SIZE = LOGGED_SLOTS * LOGGED.size


def extra_size(workers: int, max_routes: int) -> int:
    if workers == 1:
        return LOGGED_SIZE
    rings = workers * workers * ring_size(ring_capacity(workers), wire.REPLY_SIZE)
    return LOGGED_SIZE + workers * region_size(buckets_for(max_routes)) + rings


class RefusalLog:
    """Whether a refused address was logged in the last ``every`` seconds, by any worker.
    The entries are written without a lock: two workers may now and then both log one
    address, which is all a race can cost."""

    def __init__(self, seg: Segment) -> None:
        self.mm = seg.mm
        self.off = seg.extra_off

    def due(self, address: bytes, now: float, every: float) -> bool:
        """True (and remembered) if ``address`` should be logged now."""
        off = self.off + hash(address) % LOGGED_SLOTS * LOGGED.size
        seen, when = LOGGED.unpack_from(self.mm, off)
        if seen == address.ljust(16, b"\0") and now - when < every:
            return False
        LOGGED.pack_into(self.mm, off, address, now)
        return True


class Shared:
    """This worker's view of what interceptd's workers share in the segment: the route table, the
    hand-off rings and the memory of refusals logged."""

    def __init__(self, seg: Segment, max_routes: int) -> None:
        w = seg.n_workers
        self.workers = w
        buckets = buckets_for(max_routes)   # room for max_routes sessions per worker
        base = seg.extra_off + LOGGED_SIZE
        self.table = KeyTable(seg.mm, base, w, buckets)
        self._rings_off = base + w * region_size(buckets)
        self._cap = ring_capacity(w)
        self._ring_size = ring_size(self._cap, wire.REPLY_SIZE)
        self.mm = seg.mm

    def ring(self, src: int, dst: int) -> Ring:
        """The ring worker ``src`` fills and worker ``dst`` drains."""
        off = self._rings_off + (src * self.workers + dst) * self._ring_size
        return Ring(self.mm, off, self._cap, wire.REPLY_SIZE)
