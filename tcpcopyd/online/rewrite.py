"""Who the target sees: the address and port of each copy of a captured session.

By default a copy keeps the client's address and port. With `-n N` (N copies of every
session), `-f K` (this instance's port block), `-c POOL` (client addresses from a pool) or
`-H IP` (loopback clients), every copy gets an address (the client's, a pool address of the
client's family chosen by a hash of the client's, or IP for 127.0.0.1 or ::1, whichever is
of its family) and a port that this worker allocates from
a class no other worker and no other instance uses: block K of the ports 1024-65535 split
in BLOCKS, and in it the ports congruent to the worker's index modulo the worker count.
Copies therefore never collide on the target, neither with each other nor across workers
or instances with different `-f`; a class that is full (every port in use toward one
target for one address) refuses the session (counted).
"""
from __future__ import annotations

import ipaddress
import socket
import zlib
from collections.abc import Callable
from typing import Final

from tcpcopyd.net.packet import packed

BLOCKS: Final = 8                       # -f takes 0 .. BLOCKS-1
FIRST_PORT: Final = 1024
BLOCK_SIZE: Final = (65536 - FIRST_PORT) // BLOCKS
LOOPBACK: Final = socket.inet_aton("127.0.0.1")
LOOPBACK6: Final = socket.inet_pton(socket.AF_INET6, "::1")


def expand_pool(items: list[str], exclude: set[str]) -> list[bytes]:
    """``198.18.6.x`` is .1-.254, an IPv6 prefix its addresses but the first (the
    subnet-router anycast address); target addresses are left out."""
    out: list[bytes] = []
    for item in items:
        if item.endswith(".x"):
            prefix = item[:-1]
            addrs = [f"{prefix}{i}" for i in range(1, 255)]
        elif "/" in item:
            hosts = [str(a) for a in ipaddress.IPv6Network(item)]
            addrs = hosts[1:] or hosts
        else:
            addrs = [item]
        out += [packed(a) for a in addrs if a not in exclude]
    return list(dict.fromkeys(out))


class Rewrite:
    """The address and port the target sees for each copy of a captured session (-n, -f, -c, -H),
    the same in every worker."""

    def __init__(self, copies: int = 1, block: int = 0, pool: list[bytes] | None = None,
                 localhost_as: bytes | None = None, worker: int = 0, workers: int = 1) -> None:
        self.copies = copies
        self.pool = [a for a in pool or [] if len(a) == 4]
        self.pool6 = [a for a in pool or [] if len(a) == 16]
        self.localhost_as = localhost_as
        self.loopback = LOOPBACK if localhost_as is None or len(localhost_as) == 4 \
            else LOOPBACK6
        self.base = FIRST_PORT + block * BLOCK_SIZE + worker
        self.step = workers
        self.count = BLOCK_SIZE // workers
        self.cursor: dict[bytes, int] = {}     # address -> next port index to try

    def address(self, src: bytes) -> bytes:
        """A pool address of the client's family (none of it in the pool: the client's
        own), or -H's for the loopback client of its family."""
        pool = self.pool if len(src) == 4 else self.pool6
        if pool:
            return pool[zlib.crc32(src) % len(pool)]
        if src == self.loopback and self.localhost_as is not None:
            return self.localhost_as
        return src

    def port(self, address: bytes, taken: Callable[[int], bool]) -> int | None:
        """A port of this worker's class that ``taken`` says is free, None if none is.
        Ports are handed out round-robin, so a freed one is not reused at once."""
        start = self.cursor.get(address)
        if start is None:
            if len(self.cursor) > 100_000:
                self.cursor.clear()
            start = zlib.crc32(address) % self.count
        for i in range(self.count):
            j = (start + i) % self.count
            p = self.base + self.step * j
            if not taken(p):
                self.cursor[address] = j + 1
                return p
        return None
