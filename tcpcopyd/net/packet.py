"""IPv4/TCP headers: their layout, declared once (the header view every decoder uses),
parsing and building on bytes (no per-packet objects on the hot paths).

Byte order: every address here is a 4-byte network-order ``bytes``; ports,
sequence numbers and windows are host ints.
"""
from __future__ import annotations

import struct
from typing import Final

from shm.record import Record

# IP protocol number of TCP
IPPROTO_TCP: Final = 6
# TCP flag bits (low byte of the offset/flags word)
FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
PSH: Final = 0x08
ACK: Final = 0x10
URG: Final = 0x20
# TCP option kinds
OPT_EOL: Final = 0
OPT_NOP: Final = 1
OPT_MSS: Final = 2
OPT_WSCALE: Final = 3
OPT_SACK_PERM: Final = 4
OPT_SACK: Final = 5
OPT_TIMESTAMP: Final = 8
# IPv4 "don't fragment" flag in the flags/fragment-offset word
IP_DF: Final = 0x4000
# the fragment-offset bits plus "more fragments"
IP_FRAG_MASK: Final = 0x3FFF
# sequence space modulus
SEQ_MOD: Final = 1 << 32

# The headers, declared once as (name, format) fields in network order: their structs,
# sizes and offsets derive from these tables, and every decoder of the project reads
# packets through them (the structs, the offsets and the helpers below)
IPV4: Final = Record("IPv4", (
    ("version_ihl", "B"),    # version (4) in the high nibble, header length / 4 in the low
    ("tos", "B"),
    ("total_length", "H"),
    ("id", "H"),
    ("fragment", "H"),       # flags (DF, MF) and fragment offset
    ("ttl", "B"),
    ("protocol", "B"),
    ("checksum", "H"),
    ("src", "4s"),
    ("dst", "4s"),
), "!")
TCP: Final = Record("TCP", (
    ("sport", "H"),
    ("dport", "H"),
    ("seq", "I"),
    ("ack", "I"),
    ("offset_flags", "H"),   # data offset / 4 in the high 4 bits, flags in the low byte
    ("window", "H"),
    ("checksum", "H"),
    ("urgent", "H"),
), "!")
# (Final: the compiled modules read them as C constants, not from a module's dict)
IP_PROTOCOL: Final[int] = IPV4.offset("protocol")
IP_TOTAL_LENGTH: Final[int] = IPV4.offset("total_length")
IP_SRC: Final[int] = IPV4.offset("src")
IP_DST: Final[int] = IPV4.offset("dst")
TCP_SPORT: Final[int] = TCP.offset("sport")
TCP_DPORT: Final[int] = TCP.offset("dport")
TCP_SEQ: Final[int] = TCP.offset("seq")
TCP_ACK: Final[int] = TCP.offset("ack")
TCP_CHECKSUM: Final[int] = TCP.offset("checksum")
TCP_DATA_OFFSET: Final[int] = TCP.offset("offset_flags")      # its high nibble
TCP_FLAGS: Final[int] = TCP_DATA_OFFSET + 1                   # the flags byte
# an IPv4 header without options followed by the fixed TCP header, read in one call
IP_TCP: Final = struct.Struct("!" + IPV4.struct.format[1:] + TCP.struct.format[1:])
HEADERS: Final[int] = IP_TCP.size
TCP_HDR: Final = TCP.struct
TS_OPT: Final = struct.Struct("!BBBBII")  # NOP NOP kind=8 len=10 TSval TSecr
U32: Final = struct.Struct("!I")
_U16: Final = struct.Struct("!H")
_PORTS_SEQ_ACK: Final = struct.Struct("!HHII")


def is_tcp_ipv4(buf: bytes | bytearray | memoryview) -> bool:
    """Whether ``buf`` (at least one IPv4 header long) says IPv4 carrying TCP."""
    return buf[0] >> 4 == 4 and buf[IP_PROTOCOL] == IPPROTO_TCP


def ip_header_length(buf: bytes | bytearray | memoryview) -> int:
    return (buf[0] & 0x0F) * 4


def tcp_header_length(buf: bytes | bytearray | memoryview, ihl: int = 20) -> int:
    """Of the TCP header at ``ihl``."""
    return (buf[ihl + TCP_DATA_OFFSET] >> 4) * 4


def total_length(buf: bytes | bytearray | memoryview) -> int:
    return _U16.unpack_from(buf, IP_TOTAL_LENGTH)[0]


def destination_port(buf: bytes | bytearray | memoryview, ihl: int = 20) -> int:
    return _U16.unpack_from(buf, ihl + TCP_DPORT)[0]


def source(buf: bytes | bytearray | memoryview) -> bytes:
    """Source address and port (6 bytes) of a packet whose IPv4 header has no options (a
    reply header)."""
    return bytes(buf[IP_SRC:IP_SRC + 4]) + bytes(buf[20 + TCP_SPORT:20 + TCP_SPORT + 2])


def destination(buf: bytes | bytearray | memoryview) -> bytes:
    """Destination address and port (6 bytes) of a packet whose IPv4 header has no
    options (a reply header)."""
    return bytes(buf[IP_DST:IP_DST + 4]) + bytes(buf[20 + TCP_DPORT:20 + TCP_DPORT + 2])


def segment_span(buf: bytes | bytearray | memoryview, n: int) -> tuple | None:
    """(source, destination, source port, destination port, seq, ack, payload start,
    payload end) of an IPv4/TCP packet of ``n`` bytes, None if it is not one. A total
    length of 0 (a segmentation offload's large packet) means all ``n`` bytes."""
    if n < HEADERS or not is_tcp_ipv4(buf):
        return None
    ihl = ip_header_length(buf)
    if ihl < 20 or n < ihl + TCP.size:
        return None
    start = ihl + tcp_header_length(buf, ihl)
    total = total_length(buf)
    end = min(n, total) if total else n
    sport, dport, seq, ack = _PORTS_SEQ_ACK.unpack_from(buf, ihl)
    return (bytes(buf[IP_SRC:IP_SRC + 4]), bytes(buf[IP_DST:IP_DST + 4]), sport, dport, seq,
            ack, start, end)


class MalformedPacket(ValueError):
    """A packet too short or inconsistent to be a TCP/IPv4 segment."""


def seq_lt(a: int, b: int) -> bool:
    """a before b in 32-bit sequence space."""
    return a != b and ((b - a) & 0xFFFFFFFF) < 0x80000000


def seq_le(a: int, b: int) -> bool:
    return ((b - a) & 0xFFFFFFFF) < 0x80000000


def seq_add(a: int, n: int) -> int:
    return (a + n) & 0xFFFFFFFF


def seq_diff(a: int, b: int) -> int:
    """a - b as a signed distance in sequence space."""
    d = (a - b) & 0xFFFFFFFF
    return d - SEQ_MOD if d >= 0x80000000 else d


class Packet:
    """Fields of one parsed TCP/IPv4 packet (used off the tightest paths)."""

    __slots__ = ("src", "dst", "sport", "dport", "seq", "ack", "flags", "window",
                 "options", "payload", "ip_len")

    def __init__(self, src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int,
                 flags: int, window: int, options: bytes, payload: bytes, ip_len: int) -> None:
        self.src, self.dst, self.sport, self.dport = src, dst, sport, dport
        self.seq, self.ack, self.flags, self.window = seq, ack, flags, window
        self.options, self.payload, self.ip_len = options, payload, ip_len


def parse(buf: bytes | memoryview, length: int | None = None) -> Packet:
    """Parse an IPv4 packet holding TCP. Raises MalformedPacket."""
    n = len(buf) if length is None else length
    if n < HEADERS:
        raise MalformedPacket(f"{n} bytes is shorter than IPv4+TCP headers")
    (vihl, _tos, tot_len, _id, frag, _ttl, proto, _csum, src, dst,
     sport, dport, seq, ack, offflags, window, _tcsum, _urg) = IP_TCP.unpack_from(buf, 0)
    if vihl >> 4 != 4:
        raise MalformedPacket(f"IP version {vihl >> 4}, not 4")
    if proto != IPPROTO_TCP:
        raise MalformedPacket(f"IP protocol {proto}, not TCP")
    if frag & IP_FRAG_MASK:
        raise MalformedPacket("IP fragment")
    ihl = ip_header_length(buf)
    if ihl != 20:
        if ihl < 20 or ihl + 20 > n:
            raise MalformedPacket(f"bad IP header length {ihl}")
        sport, dport, seq, ack, offflags, window, _tcsum, _urg = TCP_HDR.unpack_from(buf, ihl)
    thl = (offflags >> 12) * 4
    if thl < 20 or ihl + thl > n:
        raise MalformedPacket(f"bad TCP header length {thl}")
    end = tot_len if tot_len <= n else n
    if end < ihl + thl:
        raise MalformedPacket(f"IP total length {tot_len} shorter than headers")
    options = bytes(buf[ihl + TCP.size:ihl + thl])
    payload = bytes(buf[ihl + thl:end])
    return Packet(src, dst, sport, dport, seq, ack, offflags & 0x3F, window, options,
                   payload, tot_len)


def parse_options(options: bytes) -> dict[int, bytes]:
    """Option kind -> option body (without kind/length). Tolerates garbage by stopping."""
    out: dict[int, bytes] = {}
    i, n = 0, len(options)
    while i < n:
        kind = options[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            break
        olen = options[i + 1]
        if olen < 2 or i + olen > n:
            break
        out[kind] = options[i + 2:i + olen]
        i += olen
    return out


def timestamp_of(options: bytes) -> tuple[int, int] | None:
    """(TSval, TSecr) from a TCP option block, or None."""
    if not options:
        return None
    # fast path: the Linux layout NOP NOP TS at the start
    if len(options) >= 12 and options[0] == OPT_NOP and options[2] == OPT_TIMESTAMP:
        _, _, _, _, val, ecr = TS_OPT.unpack_from(options, 0)
        return val, ecr
    body = parse_options(options).get(OPT_TIMESTAMP)
    if body is None or len(body) != 8:
        return None
    return U32.unpack_from(body, 0)[0], U32.unpack_from(body, 4)[0]


def timestamp_option(tsval: int, tsecr: int) -> bytes:
    return TS_OPT.pack(OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10, tsval, tsecr)


def syn_options(mss: int, wscale: int | None, sack: bool, ts: tuple[int, int] | None) -> bytes:
    """An option block for a SYN, padded to a multiple of 4."""
    out = struct.pack("!BBH", OPT_MSS, 4, mss)
    if sack:
        out += bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERM, 2))
    if ts is not None:
        out += timestamp_option(*ts)
    if wscale is not None:
        out += bytes((OPT_NOP, OPT_WSCALE, 3, wscale))
    return out


def tcp_checksum(src: bytes, dst: bytes, segment: bytes | bytearray | memoryview) -> int:
    """TCP checksum over pseudo-header + segment (whose checksum field must be 0)."""
    n = len(segment)
    s = int.from_bytes(segment, "big")
    if n & 1:
        s <<= 8
    s += (int.from_bytes(src, "big") + int.from_bytes(dst, "big") + IPPROTO_TCP + n)
    r = s % 0xFFFF
    # a ones'-complement sum of a non-zero block is never 0: 0 mod 0xffff means 0xffff
    return 0xFFFF - r if r else 0


def _folded(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit words of ``data`` (which starts at an even offset of the segment; an odd
    last byte is the high half of its word) summed, mod 0xFFFF: 2**16 is 1 mod 0xFFFF, so
    that is the number the bytes make, mod 0xFFFF."""
    n = len(data)
    if not n:
        return 0
    s = int.from_bytes(data, "big")
    return (s << 8 if n & 1 else s) % 0xFFFF


def build(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
          window: int, options: bytes = b"", payload: bytes | memoryview = b"",
          ttl: int = 64) -> bytearray:
    """A complete IPv4+TCP packet with a valid TCP checksum.

    The IP checksum and ID are left 0: the kernel fills both for IPPROTO_RAW sockets.
    ``options`` must already be padded to a multiple of 4 bytes. The checksum is
    ``tcp_checksum``'s, summed from the fields themselves rather than from the packed
    header: only the options and the payload are read back as bytes.
    """
    olen = len(options)
    thl = 20 + olen
    tcp_len = thl + len(payload)
    total = 20 + tcp_len
    a = int.from_bytes(src, "big")
    b = int.from_bytes(dst, "big")
    offset_flags = (thl << 10) | flags
    s = ((a >> 16) + (a & 0xFFFF) + (b >> 16) + (b & 0xFFFF) + IPPROTO_TCP + tcp_len
         + sport + dport + (seq >> 16) + (seq & 0xFFFF) + (ack >> 16) + (ack & 0xFFFF)
         + offset_flags + window)
    if olen:
        s += _folded(options)
    if payload:
        s += _folded(payload)
    r = s % 0xFFFF
    # as in tcp_checksum: a sum of 0 mod 0xFFFF is 0xFFFF, whose complement is 0
    pkt = bytearray(total)
    IP_TCP.pack_into(pkt, 0, 0x45, 0, total, 0, IP_DF, ttl, IPPROTO_TCP, 0, src, dst,
                     sport, dport, seq, ack, offset_flags, window, 0xFFFF - r if r else 0, 0)
    if olen:
        pkt[HEADERS:HEADERS + olen] = options
    if payload:
        pkt[20 + thl:] = payload
    return pkt
