"""interceptd's part of its shm segment: the route key table (one region per worker) and a
hand-off ring for every ordered pair of workers."""
from __future__ import annotations

from shm.keytable import KeyTable, region_size
from shm.ring import Ring, ring_size
from shm.segment import Segment
from tcpcopyd import wire

# buckets per worker in the route table (sessions registered on that worker's connections)
ROUTE_BUCKETS = 1 << 16


def ring_capacity(workers: int) -> int:
    return 4096 if workers <= 4 else 1024


def extra_size(workers: int) -> int:
    if workers == 1:
        return 0
    rings = workers * workers * ring_size(ring_capacity(workers), wire.REPLY_SIZE)
    return workers * region_size(ROUTE_BUCKETS) + rings


class Shared:
    def __init__(self, seg: Segment) -> None:
        w = seg.n_workers
        self.workers = w
        self.table = KeyTable(seg.mm, seg.extra_off, w, ROUTE_BUCKETS)
        self._rings_off = seg.extra_off + w * region_size(ROUTE_BUCKETS)
        self._cap = ring_capacity(w)
        self._ring_size = ring_size(self._cap, wire.REPLY_SIZE)
        self.mm = seg.mm

    def ring(self, src: int, dst: int) -> Ring:
        """The ring worker ``src`` fills and worker ``dst`` drains."""
        off = self._rings_off + (src * self.workers + dst) * self._ring_size
        return Ring(self.mm, off, self._cap, wire.REPLY_SIZE)
