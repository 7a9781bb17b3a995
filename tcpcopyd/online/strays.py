"""A pool that grows and shrinks (workers = auto): packets that reach a worker other than
the one holding their session, and how they get to that one.

The kernel's fanout spreads flows over the capture sockets of the group by a hash of the
flow and the number of sockets: when a worker joins or leaves, many flows move to another
socket. A session stays with the worker that opened it (its sequence numbers, its buffers,
its registration with interceptd are there). So while more than one worker runs, each
publishes the sessions it holds in a key table in the shm segment (a region per worker,
written by that worker only, read by all without locks: ``shm.keytable``); a worker that
captures a packet, other than a SYN, of a session it does not hold looks for the holder
there and hands the packet over: a datagram on the holder's inbox, a socket pair the
master made for each worker index before the first fork. The holder reads its inbox as it
reads its capture socket. A worker alone publishes nothing and looks nothing up.
"""
from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable

from shm.keytable import KeyTable, OwnedRegion, buckets_for, region_size
from shm.segment import Segment
from tcpcopyd.online import counters as C

log = logging.getLogger("tcpcopyd.strays")

# packets read from the inbox before the loop looks at anything else
INBOX_BATCH = 256
# bytes of the sockets' buffers: a burst of handed packets waits here (a full inbox loses
# the packet, counted: strays_lost)
INBOX_BUFFER = 4 << 20
# the largest packet handed over (a captured frame is at most the capture's snap length)
FRAME_MAX = 65536 + 256


def table_size(workers: int, slots: int) -> int:
    """Bytes of the key table in the segment's extra area (none for one worker)."""
    return 0 if workers < 2 else workers * region_size(buckets_for(slots // workers))


def key_of(cap: tuple) -> bytes:
    """The captured session (client ip, client port, target ip, target port) as a key."""
    src, sport, tip, tport = cap
    return b"".join((src, sport.to_bytes(2, "big"), tip, tport.to_bytes(2, "big")))


class Inboxes:
    """One datagram socket pair per worker index, made by the master before the first
    fork: a worker reads the first socket of its own, and writes the second of another's
    to hand it a packet."""

    def __init__(self, workers: int) -> None:
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        for _ in range(workers):
            inbox, outbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            for s in (inbox, outbox):
                s.setblocking(False)
            inbox.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, INBOX_BUFFER)
            outbox.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, INBOX_BUFFER)
            self.pairs.append((inbox, outbox))

    def close(self) -> None:
        for pair in self.pairs:
            for s in pair:
                s.close()


class Strays:
    """One worker's side of the pool: its sessions published while it shares the pool, the
    packets of the others' sessions handed to them, and its inbox."""

    def __init__(self, seg: Segment, index: int, workers: int, inboxes: Inboxes,
                 offset: int, counters: list[int]) -> None:
        self.table = KeyTable(seg.mm, offset, workers, buckets_for(seg.n_slots // workers))
        self.index = index
        self.inbox = inboxes.pairs[index][0]
        self.outboxes = [outbox for _, outbox in inboxes.pairs]
        self.counters = counters
        # our region, emptied whole now, at boot (a dead predecessor may have left anything
        # in it): a worker that starts to share while it serves only publishes
        self.region = OwnedRegion(self.table, index)
        self.shared = False
        self.handed = False   # feeding the engine what another worker handed us
        self.buf = bytearray(FRAME_MAX)
        self.full_logged = False

    def share(self, keys: Iterable[tuple]) -> None:
        """Others run beside us now: publish every session we hold (then each that opens)."""
        self.shared = True
        for key in keys:
            self.publish(key)
        self.counters[C.POOL_SHARED] = 1

    def alone(self) -> None:
        """No other worker runs: nothing to publish any more."""
        if self.shared:
            self.region.clear()
            self.shared = False
        self.counters[C.POOL_SHARED] = 0

    # --------------------------------------------------------- the engine's Pool
    def publish(self, key: tuple) -> None:
        if self.shared and not self.region.put(key_of(key), self.index) \
                and not self.full_logged:
            self.full_logged = True
            log.warning("worker %d: its region of the pool's session table is full: the "
                        "packets of its newest sessions that reach another worker are not "
                        "handed over", self.index + 1)

    def withdraw(self, key: tuple) -> None:
        if self.shared:
            self.region.remove(key_of(key))

    def hand_over(self, key: tuple, frame: bytes | bytearray | memoryview, n: int) -> bool:
        if self.handed or not self.shared:
            return False
        found = self.table.find(key_of(key), skip=self.index)
        if found is None:
            return False
        try:
            self.outboxes[found[0]].send(frame[:n])
            self.counters[C.STRAYS_HANDED] += 1
        except OSError:   # its inbox is full (or gone with its worker)
            self.counters[C.STRAYS_LOST] += 1
        return True

    # --------------------------------------------------------- the inbox
    def read(self, on_packet: Callable[[memoryview | bytearray, int, float], None],
             now: float) -> None:
        """Packets of our sessions that other workers captured, a batch at most."""
        recv_into, buf, cnt = self.inbox.recv_into, self.buf, self.counters
        self.handed = True
        try:
            for _ in range(INBOX_BATCH):
                try:
                    n = recv_into(buf)
                except BlockingIOError:
                    return
                cnt[C.STRAYS_TAKEN] += 1
                on_packet(buf, n, now)
                cnt[C.CAPTURED] -= 1   # the worker that read it from its socket counted it
        finally:
            self.handed = False
