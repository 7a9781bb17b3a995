"""A key -> value table in shared memory, partitioned by writer.

Each writer (an interceptd worker) owns one region of ``buckets`` open-addressing buckets
and is the only process that writes it; any process looks keys up in any region without
locks. A bucket is a seqlock record: key (6 bytes: IPv4 address + port, network order),
state (empty / used / deleted), family and a u32 value. Deleted buckets keep probe chains
intact; the owner rebuilds its region when they pile up.

An IPv6 key (18 bytes) is kept as 48 bits of its keyed hash (the same secret as the
buckets'): the bucket stays 16 bytes. Two live IPv6 sessions whose 48 bits agree (about
one chance in 10^5 with 100 000 of them at once; nobody outside can make it happen)
would send one's replies to the other's worker, where they wait and expire: that session
retransmits, and may give up.
"""
from __future__ import annotations

import mmap

from shm import seqlock
from shm.record import Record

BUCKET = Record("Bucket", (
    ("key", "6s"),       # IPv4 address + port, network order; IPv6: see above
    ("state", "B"),      # EMPTY, USED or DELETED
    ("family", "B"),     # 4 or 6
    ("value", "I"),      # the owner's peer id
))
BUCKET_SIZE = 16                      # seq (4) + body (12)
assert 4 + BUCKET.size == BUCKET_SIZE
EMPTY, USED, DELETED = 0, 1, 2


def region_size(buckets: int) -> int:
    return buckets * BUCKET_SIZE


def buckets_for(entries: int) -> int:
    """Buckets of a region that holds up to ``entries`` keys, at most 3/4 full (a power
    of two)."""
    return 1 << (entries * 4 // 3).bit_length()


def stored(key: bytes) -> tuple[bytes, int]:
    """What a bucket holds of ``key``: (its 6 bytes, its family)."""
    if len(key) == 6:
        return key, 4
    return (hash(key) & 0xFFFFFFFFFFFF).to_bytes(6, "big"), 6


class KeyTable:
    """Keys to values in shared memory, one region per writer: each worker writes only its own
    region, any worker reads all of them without locks."""

    def __init__(self, mm: mmap.mmap, offset: int, regions: int, buckets: int) -> None:
        if buckets & (buckets - 1):
            raise ValueError("buckets must be a power of two")
        self.mm = mm
        self.offset = offset
        self.regions = regions
        self.buckets = buckets
        self.mask = buckets - 1

    def _bucket(self, region: int, i: int) -> int:
        return self.offset + (region * self.buckets + (i & self.mask)) * BUCKET_SIZE

    @staticmethod
    def _hash(key: bytes) -> int:
        """Python's own hash of bytes: SipHash keyed with a secret the interpreter draws at
        start, so nobody outside can craft keys that collide (a table full of them would
        make every lookup a scan). The workers are forked from one master and share its
        secret; a process started apart (tcpcopyctl) computes other hashes and must not
        look keys up."""
        return hash(key)

    def lookup(self, region: int, key: bytes) -> int | None:
        h = self._hash(key)
        want, family = stored(key)
        for i in range(h, h + self.buckets):
            try:
                k, state, fam, value = seqlock.read(self.mm, self._bucket(region, i), BUCKET)
            except seqlock.TornRead:
                return None
            if state == EMPTY:
                return None
            if state == USED and k == want and fam == family:
                return value
        return None

    def find(self, key: bytes, skip: int = -1) -> tuple[int, int] | None:
        """(region, value) of ``key`` in any region but ``skip``."""
        for r in range(self.regions):
            if r != skip:
                v = self.lookup(r, key)
                if v is not None:
                    return r, v
        return None


class OwnedRegion:
    """The writer's side of one region (it also keeps a local index of where keys are)."""

    def __init__(self, table: KeyTable, region: int) -> None:
        self.t = table
        self.region = region
        self.where: dict[bytes, int] = {}   # key -> bucket index
        self.tombstones: set[int] = set()   # buckets marked DELETED
        self.clear(whole=True)

    @property
    def deleted(self) -> int:
        return len(self.tombstones)

    def clear(self, whole: bool = False) -> None:
        """Empty the region: the buckets it holds (``whole``: every bucket, for a region a
        dead predecessor may have left anything in). Each is emptied as a seqlock write,
        its counter moving on: zeroing the counter with the body would let a reader that
        began before see the same counter after, and take a torn bucket (ABA)."""
        t = self.t
        mm, state_at, empty = t.mm, 4 + BUCKET.offset("state"), (bytes(6), EMPTY, 0, 0)
        held = range(t.buckets) if whole else [*self.where.values(), *self.tombstones]
        for i in held:
            off = t._bucket(self.region, i)
            if mm[off + state_at] != EMPTY or seqlock.SEQ.unpack_from(mm, off)[0] & 1:
                seqlock.write(mm, off, BUCKET, empty)
        self.where.clear()
        self.tombstones.clear()

    def put(self, key: bytes, value: int) -> bool:
        t = self.t
        i = self.where.get(key)
        if i is None:
            if len(self.where) + self.deleted >= t.buckets * 3 // 4:
                self._rebuild()
                if len(self.where) >= t.buckets * 3 // 4:
                    return False  # full
            h = t._hash(key)
            for j in range(h, h + t.buckets):
                off = t._bucket(self.region, j)
                state = t.mm[off + 4 + BUCKET.offset("state")]
                if state != USED:
                    i = j & t.mask
                    self.tombstones.discard(i)
                    break
            else:
                return False
            self.where[key] = i
        k, family = stored(key)
        seqlock.write(t.mm, t._bucket(self.region, i), BUCKET, (k, USED, family, value))
        return True

    def remove(self, key: bytes) -> None:
        i = self.where.pop(key, None)
        if i is None:
            return
        k, family = stored(key)
        seqlock.write(self.t.mm, self.t._bucket(self.region, i), BUCKET,
                      (k, DELETED, family, 0))
        self.tombstones.add(i)

    def _rebuild(self) -> None:
        entries = []
        for key, i in self.where.items():
            _, _, _, value = seqlock.read(self.t.mm, self.t._bucket(self.region, i), BUCKET)
            entries.append((key, value))
        self.clear()
        for key, value in entries:
            self.put(key, value)
