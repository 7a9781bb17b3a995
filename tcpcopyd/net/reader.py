"""The reading of a capture socket's receive ring that keeps the copy live
(``CaptureReader``), and the kernel's time of the last packet read from a plain socket.
Compiled (tcpcopyd/native.py); setting the socket and its ring up is
``tcpcopyd.net.capture``, the ring's layout ``tcpcopyd.net.ring``."""
from __future__ import annotations

import errno
import fcntl
import mmap
import socket
import struct
import time
from collections.abc import Callable
from typing import Final

from tcpcopyd.net import ring as R

# asm-generic/sockios.h: when the kernel took the last packet read (struct timespec)
SIOCGSTAMPNS: Final = 0x8907
TIMESPEC: Final = struct.Struct("qq")


def packet_time(sock: socket.socket) -> float:
    """The wall-clock time the kernel took the last packet read from ``sock`` (a socket
    read with recv, not through a ring)."""
    sec, nsec = TIMESPEC.unpack(fcntl.ioctl(sock.fileno(), SIOCGSTAMPNS, bytes(TIMESPEC.size)))
    return sec + nsec / 1e9


# what a capture socket's read says once when its interface goes down or away
INTERFACE_GONE: Final = (errno.ENETDOWN, errno.ENXIO, errno.ENODEV)
# packets handed on between two looks at how old they are, within one batch
SAMPLE_EVERY: Final = 16
# the first packet of a batch is looked at if the last look is older than this, seconds:
# a worker that stalled is caught at once
SAMPLE_INTERVAL: Final = 0.01
# the reader does not know where its run of frames starts (a new worker, or one that
# carries on from a worker that died): it looks for it
LOST: Final = -1


class CaptureReader:
    """Reads the frames the kernel filled in a capture socket's receive ring, in turn, and
    hands each packet on — a view of the ring's memory, given back to the kernel once the
    packet was handed on. It keeps the copy live: it looks at the age of every
    SAMPLE_EVERY-th packet of a batch and at the first one of a batch every
    SAMPLE_INTERVAL (the capture lag: how far behind the worker is), from the frame's
    capture time, and drops what is older than ``max_lag`` — until it is back within half
    of it — rather than hand on packets so old that their copy would no longer be live."""

    def __init__(self, sock: socket.socket, ring: mmap.mmap, max_lag: float) -> None:
        self.sock = sock
        self.ring = ring
        self.view = memoryview(ring)
        self.buf = bytearray(65536 + 64)   # a packet larger than a frame, from the queue
        self.next = LOST      # the frame to read next
        self.max_lag = max_lag
        self.lag = 0.0        # age of the last packet looked at, seconds (0: caught up)
        self.peak = 0.0       # the oldest packet handed on since take_peak(), seconds
        self.dropped = 0      # packets dropped for their age since take_dropped()
        self.lost = 0         # packets the ring could not hold whole, since take_lost()
        self.empty = 0        # reads in a row that found no frame
        self.looked = 0.0     # monotonic time of the last look at a packet's age
        self.sec = 0          # capture time of the last packet handed on (s, ns)
        self.nsec = 0

    def close(self) -> bool:
        """Unmap the ring (the mapping holds the socket open, in its fanout group, after
        its descriptor is closed); False if a view of a packet is still held."""
        try:
            self.view.release()
            self.ring.close()
        except BufferError:
            return False
        return True

    def read(self, on_packet: Callable[[memoryview | bytearray, int, float], None],
             now: float, budget: int, time_slice: float) -> None:
        """Hand on up to ``budget`` packets, for ``time_slice`` seconds at most."""
        i = self.next
        if i == LOST:
            i = self.next = self._find_start()
            if i == LOST:
                self._nothing_to_read()
                return
        view, ring = self.view, self.ring
        handed = 0
        while handed < budget:
            off = i * R.FRAME_SIZE
            status, wire, n, _mac, net, sec, nsec = R.FRAME_HEAD.unpack_from(view, off)
            if not status & R.TP_STATUS_USER:
                break
            if handed % SAMPLE_EVERY == SAMPLE_EVERY - 1 or (
                    handed == 0 and now - self.looked >= SAMPLE_INTERVAL):
                self.looked = now
                lag = self.lag = time.time() - (sec + nsec / 1e9)
                if lag > self.max_lag:
                    i = self._drop_stale(i)
                    handed += 1
                    continue
                if lag > self.peak:
                    self.peak = lag
            self.sec, self.nsec = sec, nsec
            if status & R.TP_STATUS_COPY:
                n = self._copied()
                if n > 0:
                    on_packet(self.buf, n, now)
            elif wire > n:
                self.lost += 1      # cut to the frame, and no copy: the queue was full
            else:
                on_packet(view[off + net:off + net + n], n, now)
            R.STATUS.pack_into(ring, off, R.TP_STATUS_KERNEL)
            i = i + 1 if i + 1 < R.FRAMES else 0
            handed += 1
            if handed & 63 == 0 and time.monotonic() - now > time_slice:
                break
        self.next = i
        if handed == 0:
            self._nothing_to_read()
        else:
            self.empty = 0

    def _copied(self) -> int:
        """The packet of a frame too small for it, from the socket's queue (0: gone)."""
        try:
            return self.sock.recv_into(self.buf)
        except OSError as e:
            if not isinstance(e, BlockingIOError) and e.errno not in INTERFACE_GONE:
                raise
            self.lost += 1
            return 0

    def _nothing_to_read(self) -> None:
        """Woken with no frame to read: the socket's error, said once (the interface went
        down: capture resumes by itself when it comes back, the worker's LinkWatch tells
        the operator), or a packet in the queue whose frame the reader passed; twice in a
        row, the reader looks for its frames again (it should never have to)."""
        self.lag = 0.0
        self.empty += 1
        if self.empty >= 2:
            self.next = LOST
        try:
            self.sock.recv_into(self.buf)
        except OSError as e:
            if not isinstance(e, BlockingIOError) and e.errno not in INTERFACE_GONE:
                raise

    def _find_start(self) -> int:
        """The first frame of the run the kernel handed to the reader: a frame the reader
        holds after one it does not (LOST: none; the oldest if it holds every frame)."""
        view = self.view
        oldest, when = LOST, 0.0
        before = R.STATUS.unpack_from(view, (R.FRAMES - 1) * R.FRAME_SIZE)[0] & R.TP_STATUS_USER
        for i in range(R.FRAMES):
            status, _wire, _n, _mac, _net, sec, nsec = R.FRAME_HEAD.unpack_from(
                view, i * R.FRAME_SIZE)
            held = status & R.TP_STATUS_USER
            if held and not before:
                return i
            if held and (oldest == LOST or sec + nsec / 1e9 < when):
                oldest, when = i, sec + nsec / 1e9
            before = held
        return oldest

    def _drop_stale(self, i: int) -> int:
        """The packet of frame ``i`` is too old: drop it and those behind it until they
        are younger than half of max_lag; the frame to read next."""
        view, ring = self.view, self.ring
        wall = time.time()
        while True:
            off = i * R.FRAME_SIZE
            status, _wire, _n, _mac, _net, sec, nsec = R.FRAME_HEAD.unpack_from(view, off)
            if not status & R.TP_STATUS_USER:
                self.lag = 0.0
                return i
            lag = wall - (sec + nsec / 1e9)
            if lag <= self.max_lag / 2:
                self.lag = lag
                return i
            if status & R.TP_STATUS_COPY:
                self._copied()
            R.STATUS.pack_into(ring, off, R.TP_STATUS_KERNEL)
            self.dropped += 1
            i = i + 1 if i + 1 < R.FRAMES else 0

    def last_time(self) -> float:
        """The kernel's capture time of the last packet handed on (wall clock)."""
        return self.sec + self.nsec / 1e9

    def take_lost(self) -> int:
        n, self.lost = self.lost, 0
        return n

    def take_dropped(self) -> int:
        n, self.dropped = self.dropped, 0
        return n

    def take_peak(self) -> float:
        peak, self.peak = self.peak, 0.0
        return peak
