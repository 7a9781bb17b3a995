"""Mirror mode (``--mirror``): what a traffic mirror does that an online host's own
interface does not, seen before the engine and counted per mirror source.

A mirror delivers the same packet twice (the ingress and the egress of two mirrored
ports, two sessions of one mirror): the second one is skipped (``mirror_duplicates``; a
client's own retransmission differs — its IPv4 identification, its TCP timestamp — and
goes on to the engine, which counts it ``duplicate``). A mirror cuts packets to a length
of its own (AWS to the mirror target's MTU): counted ``truncated``; the engine uses what
arrived, the rest is a gap. A mirror loses packets: the engine's ``capture_gaps``.

A **mirror source** is an online server address, the destination of the client packets
it carries (one online host mirrors its own traffic, whichever device or VNI carries
it); the first MAX_SOURCES of them are counted apart, the others together (address 0).
Compiled (tcpcopyd/native.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Final

from shm.segment import MAX_SOURCES
from tcpcopyd.online import counters as C

# the signatures of the last RECENT packets are kept: a mirror's second copy of a packet
# arrives right after the first
RECENT: Final = 4096
OTHERS: Final = b""
# the counts kept per source, in this order (shm.segment.SOURCE)
PACKETS: Final = 0
DUPLICATES: Final = 1
TRUNCATED: Final = 2
GAPS: Final = 3


class MirrorWatch:
    """Stands before the engine's ``on_client_packet``: skips a mirror's duplicates,
    counts cut packets and, per mirror source, packets, duplicates, cut packets and the
    gaps the engine found."""

    def __init__(self, on_packet: Callable[[memoryview | bytearray, int, float], None],
                 counters: list[int]) -> None:
        self.on_packet = on_packet
        self.counters = counters
        self.recent: dict[bytes, None] = {}
        self.sources: dict[bytes, list[int]] = {}

    def packet(self, buf: memoryview | bytearray, n: int, now: float) -> None:
        cnt = self.counters
        if n < 40:
            self.on_packet(buf, n, now)     # the engine counts it malformed
            return
        version = buf[0] >> 4
        if version == 4:
            ihl = (buf[0] & 0xF) << 2
            # all but the TTL and the header checksum (a router between two mirrored
            # ports changes them), then the TCP header up to its checksum
            signature = bytes(buf[0:8]) + bytes(buf[12:min(n, ihl + 18)])
            dst = bytes(buf[16:20])
            length = buf[2] << 8 | buf[3]
        elif version == 6:
            # all but the hop limit, the extension headers and TCP header behind
            signature = bytes(buf[0:7]) + bytes(buf[8:min(n, 120)])
            dst = bytes(buf[24:40])
            plen = buf[4] << 8 | buf[5]
            length = 40 + plen if plen else n
        else:
            self.on_packet(buf, n, now)
            return
        counts = self.sources.get(dst)
        if counts is None:
            counts = self._source(dst)
        counts[PACKETS] += 1
        recent = self.recent
        if signature in recent:
            cnt[C.MIRROR_DUPLICATES] += 1
            counts[DUPLICATES] += 1
            return
        recent[signature] = None
        if len(recent) > RECENT:
            del recent[next(iter(recent))]
        if length > n:
            cnt[C.TRUNCATED] += 1
            counts[TRUNCATED] += 1
        gaps = cnt[C.CAPTURE_GAPS]
        self.on_packet(buf, n, now)
        if cnt[C.CAPTURE_GAPS] != gaps:
            counts[GAPS] += 1

    def _source(self, dst: bytes) -> list[int]:
        """The counts of a source seen for the first time (those of the others, beyond
        MAX_SOURCES - 1 sources)."""
        if len(self.sources) < MAX_SOURCES - 1:
            counts = self.sources[dst] = [0, 0, 0, 0]
            return counts
        others = self.sources.get(OTHERS)
        if others is None:
            others = self.sources[OTHERS] = [0, 0, 0, 0]
        return others
