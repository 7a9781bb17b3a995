"""A named shared-memory segment, ``NAME.shm`` in the runtime directory (``shm.rundir``, a
tmpfs): header, worker records, slot table.

Every record's fields are declared once below (``shm.record.Record``). Layout
(little-endian numbers; addresses inside records are network order):
  header       HEADER_SIZE bytes: magic, layout version, kind, sizes, master pid, created
  settings     one seqlock record: the master's live settings as JSON (changed by a reload)
  supervision  one seqlock record per worker, written by the master: restarts, deaths in
               the crash-loop window, how the last one ended, when the next one is due
  workers      one seqlock record per worker: pid, cpu, started, heartbeat, counters and
               the state of its links to peers (tcpcopyd: one entry per interceptd)
  slots    ``n_slots`` seqlock records of ``slot_size`` bytes (session table)
  extra    ``extra_size`` bytes laid out by the daemon (interceptd: routes and rings)
"""
from __future__ import annotations

import glob
import json
import mmap
import os
import socket
import time
from dataclasses import dataclass

from shm import rundir, seqlock
from shm.record import Record

# a segment's file name: NAME + SUFFIX in the runtime directory
SUFFIX = ".shm"
MAGIC = b"TCPCSHM1"
LAYOUT_VERSION = 7
HEADER = Record("Header", (
    ("magic", "8s"),         # MAGIC
    ("layout", "I"),         # LAYOUT_VERSION
    ("kind", "I"),           # which daemon: 1 tcpcopyd, 2 interceptd
    ("n_workers", "I"),
    ("n_slots", "I"),        # session table: number of slots
    ("slot_size", "I"),      # bytes per slot (seqlock counter included)
    ("master_pid", "I"),
    ("extra_size", "I"),     # bytes the daemon lays out after the slots
    ("created", "d"),        # wall-clock time the master created the segment
    ("label", "20s"),        # what the instance serves (interface, ports), NUL-padded
))
HEADER_SIZE = 64
assert HEADER.size <= HEADER_SIZE
# per-worker counters kept in shm (unused ones stay 0)
N_COUNTERS = 64
# a worker's links to one peer (tcpcopyd: its control connections to one interceptd)
LINK = Record("Link", (
    ("address", "16s"),      # the peer's address, network order (IPv4: 4 bytes, then 0)
    ("family", "B"),         # 4 or 6 (0: no entry)
    ("port", "H"),
    ("links", "B"),          # connections to it
    ("up", "B"),             # of which up
    ("since", "d"),          # wall-clock time of the last change up <-> down
    ("connects", "I"),       # times a connection came up
    ("errors", "I"),         # times a connection was lost or refused
    ("reason", "40s"),       # why the last one was lost, UTF-8, NUL-padded
))
MAX_LINKS = 16
# what a worker in mirror mode counts of one mirror source (an online server address)
SOURCE = Record("Source", (
    ("address", "16s"),      # network order (IPv4: 4 bytes, then 0; all 0: the others)
    ("family", "B"),         # 4 or 6, 1 for the others (0: no entry)
    ("packets", "Q"),        # client packets it delivered
    ("duplicates", "Q"),     # of which the same packet again (skipped)
    ("truncated", "Q"),      # of which cut short
    ("gaps", "Q"),           # gaps they opened in a client's stream
))
MAX_SOURCES = 16
# one per worker, written by that worker (seqlock)
WORKER = Record("Worker", (
    ("pid", "I"),
    ("cpu", "i"),
    ("started", "d"),        # wall-clock time the worker started
    ("heartbeat", "d"),      # wall-clock time of its last write
    ("counters", f"{N_COUNTERS}Q"),
    ("links", f"{MAX_LINKS * LINK.size}s"),   # MAX_LINKS LINK entries
    ("sources", f"{MAX_SOURCES * SOURCE.size}s"),   # MAX_SOURCES SOURCE entries
))
WORKER_SIZE = 4 + WORKER.size + 4  # seq + body, padded to 8
# one per worker, written by the master (seqlock): how the arbiter supervises it
SUPERVISION = Record("Supervision", (
    ("restarts", "I"),       # workers started again at this index
    ("recent_deaths", "I"),  # deaths within the arbiter's crash-loop window
    ("last_exit", "i"),      # how the last one ended: exit code, or -signal number
    ("respawn_at", "d"),     # wall-clock time the next one is due (0: none waiting)
    ("pool", "I"),           # its place in a pool that grows and shrinks: POOL_*
))
SUPERVISION_SIZE = 4 + SUPERVISION.size + 4
# a worker index's place in the pool (workers = auto), set by the master: serving alone
# (the only worker: nothing to share), serving with others (sessions published, packets of
# another's sessions handed to it), parked (not running), retiring (no capture socket:
# finishing its sessions, their packets handed to it by the others)
POOL_ALONE, POOL_SHARED, POOL_PARKED, POOL_RETIRING = 0, 1, 2, 3
POOL_WORDS = ("serving", "serving", "parked", "retiring")
# live settings: length + JSON text, written by the master only (seqlock)
SETTINGS = Record("Settings", (
    ("length", "I"),
    ("json", "32760s"),
))
SETTINGS_SIZE = 4 + SETTINGS.size + 4


class SegmentError(RuntimeError):
    """A segment that cannot be created or attached."""


class SegmentDenied(SegmentError):
    """A segment this user may not read."""


@dataclass
class WorkerRecord:
    """What a worker's record in the segment says: who it is, its heartbeat, its supervision state,
    its counters and links."""
    index: int
    pid: int
    cpu: int
    started: float
    heartbeat: float
    counters: tuple[int, ...]
    restarts: int
    recent_deaths: int = 0
    last_exit: int = 0
    respawn_at: float = 0.0
    pool: int = 0
    links: tuple[LinkState, ...] = ()
    sources: tuple[SourceState, ...] = ()


@dataclass(frozen=True)
class SourceState:
    """What a worker counted of one mirror source ("others": those beyond MAX_SOURCES)."""
    address: str
    packets: int
    duplicates: int
    truncated: int
    gaps: int


def pack_sources(sources: dict[bytes, list[int]]) -> bytes:
    """A mirror worker's counts per source address (network order; b"": the others)."""
    out = []
    for address, (packets, duplicates, truncated, gaps) in list(sources.items())[:MAX_SOURCES]:
        family = 4 if len(address) == 4 else 6 if len(address) == 16 else 1
        out.append(SOURCE.pack(address, family, packets, duplicates, truncated, gaps))
    return b"".join(out)


def unpack_sources(blob: bytes) -> tuple[SourceState, ...]:
    out = []
    for off in range(0, len(blob) - SOURCE.size + 1, SOURCE.size):
        rec = SOURCE.unpack_from(blob, off)
        if rec.family not in (1, 4, 6):
            break
        address = socket.inet_ntop(socket.AF_INET6, rec.address) if rec.family == 6 \
            else socket.inet_ntoa(rec.address[:4]) if rec.family == 4 else "others"
        out.append(SourceState(address, rec.packets, rec.duplicates, rec.truncated, rec.gaps))
    return tuple(out)


@dataclass(frozen=True)
class LinkState:
    """A worker's connections to one peer."""
    host: str
    port: int
    links: int
    up: int
    since: float
    connects: int
    errors: int
    reason: str

    def pack(self) -> bytes:
        v6 = ":" in self.host
        address = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, self.host)
        return LINK.pack(address, 6 if v6 else 4, self.port, min(self.links, 255),
                         min(self.up, 255), self.since, self.connects & 0xFFFFFFFF,
                         self.errors & 0xFFFFFFFF, self.reason.encode()[:40])


def pack_links(links: list[LinkState]) -> bytes:
    return b"".join(link.pack() for link in links[:MAX_LINKS])


def unpack_links(blob: bytes) -> tuple[LinkState, ...]:
    out = []
    for off in range(0, len(blob) - LINK.size + 1, LINK.size):
        rec = LINK.unpack_from(blob, off)
        if rec.family not in (4, 6):
            break
        host = socket.inet_ntop(socket.AF_INET6, rec.address) if rec.family == 6 \
            else socket.inet_ntoa(rec.address[:4])
        out.append(LinkState(host, rec.port, rec.links, rec.up,
                             rec.since, rec.connects, rec.errors,
                             rec.reason.rstrip(b"\0").decode(errors="replace")))
    return tuple(out)


class Segment:
    """One daemon's shared-memory segment, attached: its header, the workers' records, the published
    settings, and the regions the daemon lays out after them."""

    def __init__(self, path: str, mm: mmap.mmap, owner: bool) -> None:
        self.path = path
        self.mm = mm
        self.owner = owner
        self.not_shared: str | None = None   # why the group of readers may not read it
        h = HEADER.unpack_from(mm, 0)
        if h.magic != MAGIC or h.layout != LAYOUT_VERSION:
            raise SegmentError(f"{path}: not a tcpcopyd segment of layout {LAYOUT_VERSION}")
        self.kind, self.n_workers, self.n_slots, self.slot_size = (
            h.kind, h.n_workers, h.n_slots, h.slot_size)
        self.master_pid, self.extra_size, self.created = h.master_pid, h.extra_size, h.created
        self.label = h.label.rstrip(b"\0").decode(errors="replace")
        self.settings_off = HEADER_SIZE
        (self.supervision_off, self.workers_off, self.slots_off, self.extra_off,
         size) = _layout(self.n_workers, self.n_slots, self.slot_size, self.extra_size)
        if size > len(mm):
            raise SegmentError(f"{path}: its header describes {size} bytes, the segment has "
                               f"{len(mm)}")

    @property
    def name(self) -> str:
        return os.path.basename(self.path)[:-len(SUFFIX)]

    def slot_offset(self, slot: int) -> int:
        return self.slots_off + slot * self.slot_size

    # worker records: written by the worker that owns the index
    def write_worker(self, index: int, pid: int, cpu: int, started: float,
                     counters: list[int], links: bytes = b"", sources: bytes = b"") -> None:
        padded = (*counters, *([0] * (N_COUNTERS - len(counters))))
        seqlock.write(self.mm, self.workers_off + index * WORKER_SIZE, WORKER,
                      (pid, cpu, started, time.time(), padded, links, sources))

    def read_worker(self, index: int) -> WorkerRecord:
        w = seqlock.read(self.mm, self.workers_off + index * WORKER_SIZE, WORKER)
        sup = self.read_supervision(index)
        return WorkerRecord(index, w.pid, w.cpu, w.started, w.heartbeat, w.counters,
                            sup.restarts, sup.recent_deaths, sup.last_exit, sup.respawn_at,
                            sup.pool, unpack_links(w.links), unpack_sources(w.sources))

    def totals(self, names: tuple[str, ...]) -> dict[str, int]:
        """The workers' counters added up, by name (a record being written is skipped)."""
        out = dict.fromkeys(names, 0)
        for i in range(self.n_workers):
            try:
                rec = self.read_worker(i)
            except seqlock.TornRead:
                continue
            for name, v in zip(names, rec.counters, strict=False):
                out[name] += v
        return out

    # supervision records: written by the master only
    def write_supervision(self, index: int, restarts: int, recent_deaths: int,
                          last_exit: int, respawn_at: float, pool: int = POOL_ALONE) -> None:
        seqlock.write(self.mm, self.supervision_off + index * SUPERVISION_SIZE, SUPERVISION,
                      (restarts, recent_deaths, last_exit, respawn_at, pool))

    def read_supervision(self, index: int) -> tuple:
        return seqlock.read(self.mm, self.supervision_off + index * SUPERVISION_SIZE,
                            SUPERVISION)

    def add_restart(self, index: int) -> None:
        sup = self.read_supervision(index)
        self.write_supervision(index, sup.restarts + 1, sup.recent_deaths, sup.last_exit,
                               sup.respawn_at, sup.pool)

    # live settings: written by the master only
    def write_settings(self, values: dict) -> None:
        blob = settings_blob(values)
        seqlock.write(self.mm, self.settings_off, SETTINGS, (len(blob), blob))

    def settings_version(self) -> int:
        """Changes whenever the settings do (a reader compares it with the last seen)."""
        return seqlock.SEQ.unpack_from(self.mm, self.settings_off)[0]

    def read_settings(self) -> dict:
        rec = seqlock.read(self.mm, self.settings_off, SETTINGS)
        return json.loads(rec.json[:rec.length]) if rec.length else {}

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


def settings_blob(values: dict) -> bytes:
    """The live settings as the segment keeps them; SegmentError if they do not fit."""
    blob = json.dumps(values, sort_keys=True).encode()
    if len(blob) > SETTINGS.size - SETTINGS.offset("json"):
        raise SegmentError(f"the live settings take {len(blob)} bytes, more than the "
                           f"segment's {SETTINGS.size - SETTINGS.offset('json')}")
    return blob


def _layout(n_workers: int, n_slots: int, slot_size: int, extra_size: int
            ) -> tuple[int, int, int, int, int]:
    """Offsets of supervision, workers, slots and extra, and the segment's size."""
    supervision = HEADER_SIZE + SETTINGS_SIZE
    workers = supervision + SUPERVISION_SIZE * n_workers
    workers += (-workers) % 8
    slots = workers + WORKER_SIZE * n_workers
    extra = slots + slot_size * n_slots
    extra += (-extra) % 64
    return supervision, workers, slots, extra, extra + extra_size


def _path(name: str) -> str:
    if "/" in name or not name or name.startswith("."):
        raise SegmentError(f"bad segment name {name!r}")
    return os.path.join(rundir.RUNTIME_DIR, name + SUFFIX)


def create(name: str, kind: int, n_workers: int, n_slots: int, slot_size: int,
           label: str = "", extra_size: int = 0) -> Segment:
    """Create (or replace a stale) segment. Fails if a live master owns it."""
    path = _path(name)
    try:
        rundir.ensure()
    except OSError as e:
        raise SegmentError(f"runtime directory: {e}") from None
    if os.path.lexists(path):
        try:
            old = attach(name)
        except SegmentError:
            old = None
        if old is not None:
            pid = old.master_pid
            old.close()
            if pid and pid != os.getpid() and pid_alive(pid):
                raise SegmentError(f"{path} belongs to running process {pid}; "
                                   f"stop it first or choose another --instance")
        os.unlink(path)
    size = _layout(n_workers, n_slots, slot_size, extra_size)[-1]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        not_shared = rundir.share_with_readers(fd)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    HEADER.pack_into(mm, 0, MAGIC, LAYOUT_VERSION, kind, n_workers, n_slots, slot_size,
                     os.getpid(), extra_size, time.time(), label.encode()[:20])
    seg = Segment(path, mm, owner=True)
    seg.not_shared = not_shared
    return seg


def attach(name: str, readonly: bool = False) -> Segment:
    """Map an existing segment (``readonly``: for a reader, who may be a member of the
    group READERS_GROUP); refuses one that is not a plain file of root's (or ours), writable
    by nobody else, whose header does not match its size."""
    path = _path(name)
    try:
        fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_NOFOLLOW
                     | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SegmentError(f"{path} does not exist (is the daemon running?)") from None
    except PermissionError:
        raise SegmentDenied(f"{path}: permission denied (run as root, or as a member of "
                            f"the group {rundir.READERS_GROUP})") from None
    except OSError as e:
        raise SegmentError(f"{path}: {e.strerror}") from None
    try:
        try:
            rundir.trusted(os.fstat(fd), path)
        except rundir.UntrustedPath as e:
            raise SegmentError(str(e)) from None
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            raise SegmentError(f"{path}: {size} bytes is too small")
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ) if readonly else mmap.mmap(fd, size)
    finally:
        os.close(fd)
    try:
        return Segment(path, mm, owner=False)
    except SegmentError:
        mm.close()
        raise


def list_segments(prefix: str) -> list[str]:
    """Names of the segments in the runtime directory that start with ``prefix``."""
    pattern = os.path.join(glob.escape(rundir.RUNTIME_DIR), glob.escape(prefix) + "*" + SUFFIX)
    return sorted(os.path.basename(p)[:-len(SUFFIX)] for p in glob.glob(pattern))


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid exists (ours to signal or not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
