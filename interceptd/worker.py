"""An interceptd worker: reads its NFQUEUE (dropping every packet: the target's replies must
never reach anyone), serves the tcpcopyd control connections it accepts, and routes reply
headers — to its own connections, or through a shm ring to the worker holding the session's
connection."""
from __future__ import annotations

import logging
import os
import select
import socket

from interceptd import counters as C
from interceptd import loop
from interceptd.control import ControlServer
from interceptd.loop import MALFORMED, QUEUED
from interceptd.nfqueue import QueueReader
from interceptd.options import Settings
from interceptd.replies import Recorder, ReplyPath
from interceptd.router import Router
from interceptd.shared import RefusalLog, Shared
from shm.segment import Segment
from shm.seqlock import TornRead
from tcpcopyd.net import wire
from tcpcopyd.net.capture import stats as capture_stats
from tcpcopyd.net.reader import INTERFACE_GONE
from tcpcopyd.service import worker as service_worker
from tcpcopyd.service.reload import SettingsWatch

log = logging.getLogger("interceptd.worker")

# packets read from a capture socket (assistant mode) before the loop looks at the rest
CAPTURE_BATCH = 512
# a hand-off ring record that announces a reply record longer than one ring record (with
# payload bytes, or an IPv6 one): its length, then as many ring records as it fills
PREFIX_MARK = b"\0PFX"
# the longest reply record
RECORD_MAX = wire.REPLY6_SIZE + wire.PREFIX_MAX


def dispatch(pkt) -> None:
    """The NFQUEUE bindings' callback. The bindings are made by the master (so a dying
    worker does not unbind its queue: packets wait in the kernel for the next one), and
    each worker reads its binding's socket itself (``interceptd.nfqueue``): nothing calls
    this but a stray read of the bindings, and what it gets is dropped."""
    pkt.drop()


class QueueWorker(service_worker.WorkerProcess):
    """One NFQUEUE (or assistant-mode capture socket) of interceptd, its control connections and its
    routes."""

    def __init__(self, cfg: Settings, index: int, cpu: int, seg: Segment,
                 listener: socket.socket, source, wakeups: list[int],
                 ipv6: bool = False) -> None:
        """``source``: this worker's NFQUEUE binding, or (assistant mode) its AF_PACKET
        capture socket; ``wakeups``: one eventfd per worker, "your ring has records";
        ``ipv6``: the target's IPv6 replies reach it too (tcpcopyd may register IPv6
        sessions)."""
        super().__init__(index, cfg.queues, cpu, seg)
        self.cfg = cfg
        self.listener = listener
        self.capture = source if isinstance(source, socket.socket) else None
        self.nfq = None if self.capture else source
        self.queue_num = cfg.queue_num + index
        self.source_name = (f"capture on {cfg.interface}" if self.capture
                            else f"NFQUEUE {self.queue_num}")
        # NFQUEUE verdicts are netlink messages that need CAP_NET_ADMIN each time; a
        # capture socket needs nothing once open
        self.capabilities = () if self.capture else ("CAP_NET_ADMIN",)
        self.wakeups = wakeups
        self.ipv6 = ipv6

    @property
    def title(self) -> str:
        where = f"capture={self.cfg.interface}" if self.capture else f"queue={self.queue_num}"
        return f"interceptd: worker {self.index + 1}/{self.n_workers} {where}"

    def setup(self) -> None:
        self.counters = [0] * len(C.NAMES)
        n = self.n_workers
        shared = Shared(self.seg, self.cfg.max_routes) if n > 1 else None
        self.router = Router(self.counters, self.index, shared.table if shared else None,
                             self.cfg.max_routes, self.cfg.max_routes_per_address)
        # hand-off rings: from every other worker to us, and from us to every other one
        self.inbound = [shared.ring(src, self.index) for src in range(n)
                        if src != self.index] if shared else []
        self.outbound = {dst: shared.ring(self.index, dst) for dst in range(n)
                         if dst != self.index} if shared else {}
        self.epoll = select.epoll()
        if self.capture is not None:
            self.capture.setblocking(False)
            self.source_fd = self.capture.fileno()
        else:
            self.queue = QueueReader(self.nfq.get_fd())
            self.source_fd = self.queue.fileno()
        self.epoll.register(self.source_fd, select.EPOLLIN)
        self.epoll.register(self.wakeups[self.index], select.EPOLLIN)
        cfg = self.cfg
        self.control = ControlServer(self.listener, self.epoll, self.router, self.counters,
                                     self.index, cfg.allow, cfg.secret, cfg.max_connections,
                                     cfg.max_connections_per_address,
                                     RefusalLog(self.seg).due, self.ipv6)
        self.watch = SettingsWatch("interceptd", self.seg, self.cfg)
        self.recorder = Recorder()
        self.replies = ReplyPath(self.recorder, self.router, self.counters, self._unexpected)
        log.info("worker %d reading %s, control port %s:%d", self.index + 1,
                 self.source_name, *self.listener.getsockname()[:2])

    def run(self) -> None:
        loop.serve(self, self.epoll, self.source_fd, self.wakeups[self.index],
                   self.queue if self.capture is None else None, self.replies, self.router,
                   self.control, self.counters)
        self.control.close()
        if self.capture is None:
            self.queue.close()
        self.heartbeat()
        log.info("worker %d stopped", self.index + 1)

    def sync(self, now: float) -> None:
        """Every SYNC_INTERVAL: replies waiting for their session, reloaded settings (only
        logging is live here: the watch applies it), the gauges, the heartbeat."""
        cnt = self.counters
        self.router.retry_delayed(now)
        self.control.tick(now)
        self.watch.poll()
        cnt[C.INDEX["peers"]] = len(self.control)
        cnt[C.INDEX["peers_payload"]] = self.control.payload_peers()
        self.recorder.want_prefix = self._prefix_wanted()
        cnt[C.INDEX["routes"]] = len(self.router.routes)
        drops = C.INDEX["queue_drops"]
        before = cnt[drops]
        if self.capture is not None:
            cnt[drops] += capture_stats(self.capture)[1]
        else:
            cnt[drops] = queue_drops(self.queue_num)
        self.falling_behind(max(0, cnt[drops] - before), "packets of the target dropped "
                            "by the kernel (queue_drops: the queue was full), which "
                            "tcpcopyd then waits or retransmits for", "queues", now)
        self.heartbeat()

    @staticmethod
    def _unexpected(packet: bytes) -> None:
        log.exception("a packet of the target could not be handled (%d bytes, skipped)",
                      len(packet))

    def read_capture(self, now: float) -> None:
        """Assistant mode: replies the target routed here (the kernel drops them after us,
        since this host does not forward)."""
        cnt, recv, handle = self.counters, self.capture.recv, self.replies.handle
        for _ in range(CAPTURE_BATCH):
            try:
                packet = recv(65536)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in INTERFACE_GONE:   # down: the capture resumes when it is up
                    return
                raise
            cnt[QUEUED] += 1
            handle(packet, now)

    def _prefix_wanted(self) -> bool:
        """Whether any worker serves a tcpcopyd that asked for the answers' first bytes."""
        i = C.INDEX["peers_payload"]
        if self.counters[i]:
            return True
        for w in range(self.n_workers):
            try:
                if w != self.index and self.seg.read_worker(w).counters[i]:
                    return True
            except TornRead:
                return self.recorder.want_prefix
        return False

    def drain(self, now: float) -> None:
        deliver = self.router.deliver
        for ring in self.inbound:
            records, broken = from_ring_records(ring.pop_all())
            for rec in records:
                deliver(rec, now)
            self.counters[C.INDEX["handed_in"]] += len(records)
            self.counters[MALFORMED] += broken

    def hand_off(self) -> None:
        for dst, records in self.router.outbox.items():
            ring = self.outbound[dst]
            room = ring.capacity - len(ring)
            flat: list[bytes] = []
            n = 0
            for rec in records:
                group = ring_records(rec)
                if len(flat) + len(group) > room:
                    break
                flat += group
                n += 1
            ring.push(flat)
            self.counters[C.INDEX["handed_off"]] += n
            if n < len(records):
                self.counters[C.INDEX["handoff_full"]] += len(records) - n
            if n:
                try:
                    os.eventfd_write(self.wakeups[dst], 1)
                except BlockingIOError:
                    pass
        self.router.outbox.clear()


def ring_records(record: bytes) -> list[bytes]:
    """A reply record as hand-off ring records: an IPv4 header alone, or a PREFIX_MARK
    record with the record's length, then the record cut in ring records."""
    size = wire.REPLY_SIZE
    if len(record) == size:
        return [record]
    head = (PREFIX_MARK + len(record).to_bytes(2, "big")).ljust(size, b"\0")
    return [head, *(record[i:i + size].ljust(size, b"\0")
                    for i in range(0, len(record), size))]


def from_ring_records(ring: list[bytes]) -> tuple[list[bytes], int]:
    """The reply records a hand-off ring held (``ring_records`` in reverse), and how many
    groups were broken (a PREFIX_MARK group cut short, a record of the wrong size: they
    are skipped; only a bug or a damaged segment makes them)."""
    size = wire.REPLY_SIZE
    out: list[bytes] = []
    broken = i = 0
    while i < len(ring):
        r = ring[i]
        if len(r) != size:
            broken, i = broken + 1, i + 1
        elif r[:4] == PREFIX_MARK:
            length = int.from_bytes(r[4:6], "big")
            chunks = -(-length // size)
            group = ring[i + 1:i + 1 + chunks]
            i += 1 + chunks
            if length > RECORD_MAX or len(group) < chunks:
                broken += 1
                continue
            out.append(b"".join(group)[:length])
        else:
            out.append(r)
            i += 1
    return out, broken


def queue_drops(queue_num: int) -> int:
    """Packets the kernel dropped for this queue (queue full + user-space too slow)."""
    try:
        with open("/proc/net/netfilter/nfnetlink_queue") as f:
            for line in f:
                fields = line.split()
                if fields and int(fields[0]) == queue_num and len(fields) >= 7:
                    return int(fields[5]) + int(fields[6])
    except (OSError, ValueError):
        pass
    return 0
