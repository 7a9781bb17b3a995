"""The reading of a capture socket that keeps the copy live (``CaptureReader``), and the
kernel's time of a packet read. Compiled (tcpcopyd/native.py); setting the socket up is
``tcpcopyd.net.capture``."""
from __future__ import annotations

import errno
import fcntl
import socket
import struct
import time
from collections.abc import Callable
from typing import Final

# asm-generic/sockios.h: when the kernel took the last packet read (struct timespec)
SIOCGSTAMPNS: Final = 0x8907
TIMESPEC: Final = struct.Struct("qq")


def packet_time(sock: socket.socket) -> float:
    """The wall-clock time the kernel took the last packet read from ``sock``."""
    sec, nsec = TIMESPEC.unpack(fcntl.ioctl(sock.fileno(), SIOCGSTAMPNS, bytes(TIMESPEC.size)))
    return sec + nsec / 1e9


# what a capture socket's read says once when its interface goes down or away
INTERFACE_GONE: Final = (errno.ENETDOWN, errno.ENXIO, errno.ENODEV)
# packets handed on between two looks at how old they are, within one batch
SAMPLE_EVERY: Final = 16
# the first packet of a batch is looked at if the last look is older than this, seconds:
# a worker that stalled is caught at once, one that keeps up pays no extra system call
# for each wake-up
SAMPLE_INTERVAL: Final = 0.01


class CaptureReader:
    """Reads a capture socket in batches and keeps the copy live: it looks at the age of
    every SAMPLE_EVERY-th packet of a batch and at the first one of a batch every
    SAMPLE_INTERVAL (the capture lag: how far behind the worker is) and drops
    what is older than ``max_lag`` — until it is back within half of it — rather than
    hand on packets so old that their copy would no longer be a live one."""

    def __init__(self, sock: socket.socket, max_lag: float) -> None:
        self.sock = sock
        self.buf = bytearray(65536 + 64)
        self.max_lag = max_lag
        self.lag = 0.0        # age of the last packet looked at, seconds (0: caught up)
        self.peak = 0.0       # the oldest packet handed on since take_peak(), seconds
        self.dropped = 0      # packets dropped for their age since take_dropped()
        self.looked = 0.0     # monotonic time of the last look at a packet's age

    def read(self, on_packet: Callable[[bytearray, int, float], None], now: float,
             budget: int, time_slice: float) -> None:
        """Hand on up to ``budget`` packets, for ``time_slice`` seconds at most."""
        recv_into, buf = self.sock.recv_into, self.buf
        for i in range(budget):
            try:
                n = recv_into(buf)
            except BlockingIOError:
                self.lag = 0.0
                return
            except OSError as e:
                if e.errno not in INTERFACE_GONE:
                    raise
                # the interface went down: the kernel says so once; capture resumes by
                # itself when it comes back (the worker's LinkWatch tells the operator)
                self.lag = 0.0
                return
            if i % SAMPLE_EVERY == SAMPLE_EVERY - 1 or (
                    i == 0 and now - self.looked >= SAMPLE_INTERVAL):
                self.looked = now
                lag = self.lag = time.time() - packet_time(self.sock)
                if lag > self.max_lag:
                    self._drop_stale()
                    continue
                if lag > self.peak:
                    self.peak = lag
            on_packet(buf, n, now)
            if i & 63 == 63 and time.monotonic() - now > time_slice:
                return

    def _drop_stale(self) -> None:
        """The packet just read is too old: drop it and those behind it until they are
        younger than half of max_lag."""
        recv_into, buf = self.sock.recv_into, self.buf
        self.dropped += 1
        while self.lag > self.max_lag / 2:
            for _ in range(SAMPLE_EVERY):
                try:
                    recv_into(buf)
                except OSError as e:
                    if not isinstance(e, BlockingIOError) and e.errno not in INTERFACE_GONE:
                        raise
                    self.lag = 0.0
                    return
                self.dropped += 1
            self.lag = time.time() - packet_time(self.sock)

    def take_dropped(self) -> int:
        n, self.dropped = self.dropped, 0
        return n

    def take_peak(self) -> float:
        peak, self.peak = self.peak, 0.0
        return peak
