"""Reading a capture file for offline replay (`tcpcopyd -i FILE.pcap`): pcap or pcapng as
tcpdump writes them, Ethernet (VLAN tags too), Linux cooked (`tcpdump -i any`, v1 and v2),
raw IP and BSD loopback links. Yields the IPv4 and IPv6 packets with their capture time;
what cannot be replayed is counted, never fatal."""
from __future__ import annotations

import collections
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

# link types (pcap LINKTYPE_* values)
ETHERNET = 1
NULL = 0
LOOP = 108
RAW = (101, 12, 14)
IPV4 = 228
IPV6 = 229
LINUX_SLL = 113
LINUX_SLL2 = 276
ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
ETH_IP = (ETH_IPV4, ETH_IPV6)
# BSD loopback's address families of IPv6 (Linux 10 aside: BSDs, macOS)
BSD_INET6 = (10, 24, 28, 30)
ETH_VLAN = (0x8100, 0x88A8, 0x9100)


class CaptureFileError(RuntimeError):
    """A file that is not a capture this reader knows."""


def _open_reader(f):
    import dpkt
    bad = (ValueError, dpkt.NeedData, dpkt.UnpackError, struct.error)
    try:
        return dpkt.pcap.Reader(f)
    except bad:
        f.seek(0)
    try:
        return dpkt.pcapng.Reader(f)
    except bad:
        raise CaptureFileError("not a pcap or pcapng file (write one with tcpdump -w FILE)") \
            from None


def _records(reader, skipped: collections.Counter) -> Iterator[tuple[float, bytes]]:
    """The reader's records; a damaged tail (a capture cut short) ends them, counted."""
    import dpkt
    it = iter(reader)
    while True:
        try:
            yield next(it)
        except StopIteration:
            return
        except (dpkt.NeedData, dpkt.UnpackError, struct.error, ValueError):
            skipped["damaged_tail"] += 1
            return


def ip_payload(link: int, frame: bytes) -> bytes | None:
    """The IPv4 or IPv6 packet in a frame of this link type, None if it carries something
    else."""
    if link == ETHERNET:
        off, ethertype = 14, _ethertype(frame, 12) if len(frame) >= 14 else 0
        while ethertype in ETH_VLAN and len(frame) >= off + 4:
            ethertype = _ethertype(frame, off + 2)
            off += 4
        return frame[off:] if ethertype in ETH_IP else None
    if link in RAW or link == IPV4 or link == IPV6:
        return frame if frame[:1] and frame[0] >> 4 in (4, 6) else None
    if link == LINUX_SLL:
        return frame[16:] if len(frame) >= 16 and _ethertype(frame, 14) in ETH_IP else None
    if link == LINUX_SLL2:
        return frame[20:] if len(frame) >= 20 and _ethertype(frame, 0) in ETH_IP else None
    if link in (NULL, LOOP):
        return _loopback(frame)
    raise CaptureFileError(f"link type {link} is not supported (capture on an Ethernet "
                           "interface, or with tcpdump -i any)")


def _loopback(frame: bytes) -> bytes | None:
    """BSD loopback: a 4-byte address family in the writer's byte order."""
    if len(frame) < 4:
        return None
    family = struct.unpack_from("<I", frame)[0]
    if family > 0xFFFF:
        family = struct.unpack_from(">I", frame)[0]
    return frame[4:] if family == 2 or family in BSD_INET6 else None


def _ethertype(frame: bytes, at: int) -> int:
    return struct.unpack_from("!H", frame, at)[0]


def ip_length(pkt: bytes) -> int:
    """How long the IPv4 or IPv6 packet says it is (an IPv6 jumbogram's 0: all of it)."""
    if pkt[0] >> 4 == 6:
        plen = struct.unpack_from("!H", pkt, 4)[0]
        return 40 + plen if plen else len(pkt)
    return struct.unpack_from("!H", pkt, 2)[0]


@dataclass
class Position:
    """How far a reading of the file has come, in bytes (updated every few records)."""
    size: int = 0
    offset: int = 0

    @property
    def share(self) -> float:
        return min(1.0, self.offset / self.size) if self.size else 1.0


def packets(path: str, skipped: collections.Counter, headers_only: bool = False,
            position: Position | None = None) -> Iterator[tuple[float, bytes]]:
    """(capture time, IP packet) of every IPv4 and IPv6 frame in the file; ``skipped``
    counts the rest by reason ("not_ip", "truncated"). With ``headers_only``, packets cut by the
    snap length come too, as cut (for who reads only their headers). ``position``, if
    given, follows the reading."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CaptureFileError(f"{path}: {e.strerror}") from None
    with f:
        reader = _open_reader(f)
        link = reader.datalink()
        ip_payload(link, b"")   # unknown link types fail here, before any packet
        snaplen = getattr(reader, "snaplen", 0) or 0
        if position is not None:
            position.size, position.offset = os.fstat(f.fileno()).st_size, f.tell()
        for n, (ts, frame) in enumerate(_records(reader, skipped)):
            if position is not None and n % 256 == 0:
                position.offset = f.tell()
            pkt = ip_payload(link, frame)
            if not pkt or len(pkt) < (40 if pkt[0] >> 4 == 6 else 20):
                skipped["not_ip"] += 1
                continue
            total = ip_length(pkt)
            if total > len(pkt) and not headers_only:
                # cut by the capture's snap length: the payload is incomplete
                skipped["truncated"] += 1
                if snaplen and skipped["truncated"] == 1:
                    skipped["snaplen"] = snaplen
                continue
            yield float(ts), pkt[:total]
        if position is not None:
            position.offset = position.size
