"""A named shared-memory segment in /dev/shm: header, worker records, slot table.

Layout (little-endian numbers; addresses inside records are network order):
  header   HEADER_SIZE bytes: magic, layout version, kind, sizes, master pid, created
  settings one seqlock record: the master's live settings as JSON (changed by a reload)
  restarts one u32 per worker, written by the master only
  workers  one seqlock record per worker: pid, cpu, started, heartbeat, counters
  slots    ``n_slots`` seqlock records of ``slot_size`` bytes (session table)
  extra    ``extra_size`` bytes laid out by the daemon (interceptd: routes and rings)
"""
from __future__ import annotations

import glob
import json
import mmap
import os
import struct
import time
from dataclasses import dataclass

from shm import seqlock

SHM_DIR = "/dev/shm"
MAGIC = b"TCPCSHM1"
LAYOUT_VERSION = 2
HEADER = struct.Struct("<8sIIIIIIId20s")
HEADER_SIZE = 64
assert HEADER.size <= HEADER_SIZE
# per-worker counters kept in shm (unused ones stay 0)
N_COUNTERS = 40
WORKER = struct.Struct(f"<Iidd{N_COUNTERS}Q")
WORKER_SIZE = 4 + WORKER.size + 4  # seq + body, padded to 8
# live settings: length + JSON text, written by the master only
SETTINGS = struct.Struct("<I2040s")
SETTINGS_SIZE = 4 + SETTINGS.size + 4


class SegmentError(RuntimeError):
    """A segment that cannot be created or attached."""


@dataclass
class WorkerRecord:
    index: int
    pid: int
    cpu: int
    started: float
    heartbeat: float
    counters: tuple[int, ...]
    restarts: int


class Segment:
    def __init__(self, path: str, mm: mmap.mmap, owner: bool) -> None:
        self.path = path
        self.mm = mm
        self.owner = owner
        (magic, version, self.kind, self.n_workers, self.n_slots, self.slot_size,
         self.master_pid, self.extra_size, self.created, label) = HEADER.unpack_from(mm, 0)
        if magic != MAGIC or version != LAYOUT_VERSION:
            raise SegmentError(f"{path}: not a tcpcopyd segment of layout {LAYOUT_VERSION}")
        self.label = label.rstrip(b"\0").decode(errors="replace")
        self.settings_off = HEADER_SIZE
        (self.restarts_off, self.workers_off, self.slots_off, self.extra_off,
         _size) = _layout(self.n_workers, self.n_slots, self.slot_size, self.extra_size)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def slot_offset(self, slot: int) -> int:
        return self.slots_off + slot * self.slot_size

    # worker records: written by the worker that owns the index
    def write_worker(self, index: int, pid: int, cpu: int, started: float,
                     counters: list[int]) -> None:
        vals = (pid, cpu, started, time.time(), *counters, *([0] * (N_COUNTERS - len(counters))))
        seqlock.write(self.mm, self.workers_off + index * WORKER_SIZE, WORKER, vals)

    def read_worker(self, index: int) -> WorkerRecord:
        pid, cpu, started, hb, *counters = seqlock.read(
            self.mm, self.workers_off + index * WORKER_SIZE, WORKER)
        restarts = struct.unpack_from("<I", self.mm, self.restarts_off + 4 * index)[0]
        return WorkerRecord(index, pid, cpu, started, hb, tuple(counters), restarts)

    # live settings: written by the master only
    def write_settings(self, values: dict) -> None:
        blob = json.dumps(values, sort_keys=True).encode()
        if len(blob) > SETTINGS.size - 4:
            raise SegmentError(f"settings of {len(blob)} bytes do not fit in the segment")
        seqlock.write(self.mm, self.settings_off, SETTINGS, (len(blob), blob))

    def settings_version(self) -> int:
        """Changes whenever the settings do (a reader compares it with the last seen)."""
        return seqlock.SEQ.unpack_from(self.mm, self.settings_off)[0]

    def read_settings(self) -> dict:
        n, blob = seqlock.read(self.mm, self.settings_off, SETTINGS)
        return json.loads(blob[:n]) if n else {}

    # restarts: written by the master only
    def add_restart(self, index: int) -> None:
        off = self.restarts_off + 4 * index
        n = struct.unpack_from("<I", self.mm, off)[0]
        struct.pack_into("<I", self.mm, off, n + 1)

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            pass  # a memoryview still points into the map; the OS frees it at exit

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _layout(n_workers: int, n_slots: int, slot_size: int, extra_size: int
            ) -> tuple[int, int, int, int, int]:
    """Offsets of restarts, workers, slots and extra, and the segment's size."""
    restarts = HEADER_SIZE + SETTINGS_SIZE
    workers = restarts + 4 * n_workers
    workers += (-workers) % 8
    slots = workers + WORKER_SIZE * n_workers
    extra = slots + slot_size * n_slots
    extra += (-extra) % 64
    return restarts, workers, slots, extra, extra + extra_size


def _path(name: str) -> str:
    if "/" in name or not name:
        raise SegmentError(f"bad segment name {name!r}")
    return os.path.join(SHM_DIR, name)


def create(name: str, kind: int, n_workers: int, n_slots: int, slot_size: int,
           label: str = "", extra_size: int = 0) -> Segment:
    """Create (or replace a stale) segment. Fails if a live master owns it."""
    path = _path(name)
    if os.path.exists(path):
        try:
            old = attach(name)
        except SegmentError:
            old = None
        if old is not None:
            pid = old.master_pid
            old.close()
            if pid and pid != os.getpid() and _alive(pid):
                raise SegmentError(f"{path} belongs to running process {pid}; "
                                   f"stop it first or choose another --instance")
        os.unlink(path)
    size = _layout(n_workers, n_slots, slot_size, extra_size)[-1]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    HEADER.pack_into(mm, 0, MAGIC, LAYOUT_VERSION, kind, n_workers, n_slots, slot_size,
                     os.getpid(), extra_size, time.time(), label.encode()[:20])
    return Segment(path, mm, owner=True)


def attach(name: str) -> Segment:
    path = _path(name)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise SegmentError(f"{path} does not exist (is the daemon running?)") from None
    try:
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            raise SegmentError(f"{path}: {size} bytes is too small")
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    return Segment(path, mm, owner=False)


def list_segments(prefix: str) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(SHM_DIR, prefix + "*")))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
