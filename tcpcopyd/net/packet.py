"""IPv4/TCP and IPv6/TCP headers: their layout, declared once (the header view every
decoder uses), parsing and building on bytes (no per-packet objects on the hot paths).

Byte order: every address here is a network-order ``bytes``, 4 bytes long for IPv4 and 16
for IPv6 (its length is the family wherever a packet is built); ports, sequence numbers
and windows are host ints.
"""
from __future__ import annotations

import socket
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
IPV6: Final = Record("IPv6", (
    ("version_class_flow", "I"),   # version (6), traffic class (8 bits), flow label (20)
    ("payload_length", "H"),       # what follows this header; 0 with a jumbo payload
    ("next_header", "B"),
    ("hop_limit", "B"),
    ("src", "16s"),
    ("dst", "16s"),
), "!")
IP6_HEADER: Final[int] = IPV6.size
IP6_PAYLOAD_LENGTH: Final[int] = IPV6.offset("payload_length")
IP6_NEXT_HEADER: Final[int] = IPV6.offset("next_header")
IP6_SRC: Final[int] = IPV6.offset("src")
IP6_DST: Final[int] = IPV6.offset("dst")
# the IPv6 extension headers (RFC 8200) a TCP segment may come behind
IP6_HOP_BY_HOP: Final = 0
IP6_ROUTING: Final = 43
IP6_FRAGMENT: Final = 44
IP6_ESP: Final = 50
IP6_AUTH: Final = 51
IP6_DEST_OPTIONS: Final = 60
# a chain longer than this is not followed (no stack sends one; a hostile one costs little)
IP6_CHAIN_MAX: Final = 8
# what ``tcp_offset6`` says of a packet that is not TCP, or whose TCP header it cannot reach
# (a fragment but the first of an atomic one, ESP, a chain too long or cut short)
NOT_TCP: Final = -1
NOT_FOLLOWED: Final = -2
# an IPv4 header without options followed by the fixed TCP header, read in one call
IP_TCP: Final = struct.Struct("!" + IPV4.struct.format[1:] + TCP.struct.format[1:])
HEADERS: Final[int] = IP_TCP.size
# the same for IPv6 without extension headers
IP6_TCP: Final = struct.Struct("!" + IPV6.struct.format[1:] + TCP.struct.format[1:])
HEADERS6: Final[int] = IP6_TCP.size
TCP_HDR: Final = TCP.struct
TS_OPT: Final = struct.Struct("!BBBBII")  # NOP NOP kind=8 len=10 TSval TSecr
U32: Final = struct.Struct("!I")
U16: Final = struct.Struct("!H")
_PORTS_SEQ_ACK: Final = struct.Struct("!HHII")


def is_tcp_ipv4(buf: bytes | bytearray | memoryview) -> bool:
    """Whether ``buf`` (at least one IPv4 header long) says IPv4 carrying TCP."""
    return buf[0] >> 4 == 4 and buf[IP_PROTOCOL] == IPPROTO_TCP


def tcp_offset6(buf: bytes | bytearray | memoryview, n: int) -> int:
    """Where the TCP header of the IPv6 packet of ``n`` bytes in ``buf`` begins, the
    extension headers before it followed; NOT_TCP or NOT_FOLLOWED (see above)."""
    if n < IP6_HEADER:
        return NOT_FOLLOWED
    nxt = buf[IP6_NEXT_HEADER]
    at = IP6_HEADER
    for _ in range(IP6_CHAIN_MAX):
        if nxt == IPPROTO_TCP:
            return at if at + TCP.size <= n else NOT_FOLLOWED
        if at + 8 > n:
            return NOT_FOLLOWED if nxt in (IP6_HOP_BY_HOP, IP6_ROUTING, IP6_FRAGMENT,
                                           IP6_AUTH, IP6_DEST_OPTIONS) else NOT_TCP
        if nxt == IP6_HOP_BY_HOP or nxt == IP6_ROUTING or nxt == IP6_DEST_OPTIONS:
            length = (buf[at + 1] + 1) * 8
        elif nxt == IP6_AUTH:
            length = (buf[at + 1] + 2) * 4
        elif nxt == IP6_FRAGMENT:
            # only an atomic fragment (offset 0, no more to come) holds the whole segment
            if (buf[at + 2] << 8 | buf[at + 3]) & 0xFFF9:
                return NOT_FOLLOWED
            length = 8
        elif nxt == IP6_ESP:
            return NOT_FOLLOWED
        else:
            return NOT_TCP
        nxt = buf[at]
        at += length
    return NOT_FOLLOWED


def ip_header_length(buf: bytes | bytearray | memoryview) -> int:
    return (buf[0] & 0x0F) * 4


def tcp_header_length(buf: bytes | bytearray | memoryview, ihl: int = 20) -> int:
    """Of the TCP header at ``ihl``."""
    return (buf[ihl + TCP_DATA_OFFSET] >> 4) * 4


def total_length(buf: bytes | bytearray | memoryview) -> int:
    return U16.unpack_from(buf, IP_TOTAL_LENGTH)[0]


def destination_port(buf: bytes | bytearray | memoryview, ihl: int = 20) -> int:
    return U16.unpack_from(buf, ihl + TCP_DPORT)[0]


def source(buf: bytes | bytearray | memoryview) -> bytes:
    """Source address and port (6 bytes; 18 for IPv6) of a packet whose IPv4 header has no
    options, or whose IPv6 header no extension header (a reply header)."""
    if buf[0] >> 4 == 6:
        return bytes(buf[IP6_SRC:IP6_SRC + 16]) + bytes(buf[40 + TCP_SPORT:40 + TCP_SPORT + 2])
    return bytes(buf[IP_SRC:IP_SRC + 4]) + bytes(buf[20 + TCP_SPORT:20 + TCP_SPORT + 2])


def destination(buf: bytes | bytearray | memoryview) -> bytes:
    """Destination address and port (6 bytes; 18 for IPv6) of a reply header (see
    ``source``)."""
    if buf[0] >> 4 == 6:
        return bytes(buf[IP6_DST:IP6_DST + 16]) + bytes(buf[40 + TCP_DPORT:40 + TCP_DPORT + 2])
    return bytes(buf[IP_DST:IP_DST + 4]) + bytes(buf[20 + TCP_DPORT:20 + TCP_DPORT + 2])


def segment_span(buf: bytes | bytearray | memoryview, n: int) -> tuple | None:
    """(source, destination, source port, destination port, seq, ack, payload start,
    payload end) of an IPv4/TCP packet of ``n`` bytes, None if it is not one. A total
    length of 0 (a segmentation offload's large packet) means all ``n`` bytes."""
    if n and buf[0] >> 4 == 6:
        return _segment_span6(buf, n)
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


def _segment_span6(buf: bytes | bytearray | memoryview, n: int) -> tuple | None:
    at = tcp_offset6(buf, n)
    if at < 0:
        return None
    start = at + tcp_header_length(buf, at)
    plen = U16.unpack_from(buf, IP6_PAYLOAD_LENGTH)[0]
    end = min(n, IP6_HEADER + plen) if plen else n
    sport, dport, seq, ack = _PORTS_SEQ_ACK.unpack_from(buf, at)
    return (bytes(buf[IP6_SRC:IP6_SRC + 16]), bytes(buf[IP6_DST:IP6_DST + 16]), sport, dport,
            seq, ack, start, end)


def address_text(ip: bytes) -> str:
    """An address as people write it: 198.18.1.1, fd18:1::1."""
    return socket.inet_ntop(socket.AF_INET if len(ip) == 4 else socket.AF_INET6, ip)


def packed(address: str) -> bytes:
    """An IPv4 or IPv6 address as its bytes (``address_text`` in reverse)."""
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)


def endpoint(ip: bytes, port: int) -> str:
    """An address and port as people write them: 198.18.1.1:80, [fd18:1::1]:80."""
    text = address_text(ip)
    return f"{text}:{port}" if len(ip) == 4 else f"[{text}]:{port}"


class MalformedPacket(ValueError):
    """A packet too short or inconsistent to be a TCP/IPv4 or TCP/IPv6 segment."""


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
    """Parse an IPv4 or IPv6 packet holding TCP. Raises MalformedPacket."""
    n = len(buf) if length is None else length
    if n and buf[0] >> 4 == 6:
        return _parse6(buf, n)
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


def _parse6(buf: bytes | memoryview, n: int) -> Packet:
    at = tcp_offset6(buf, n)
    if at == NOT_TCP:
        raise MalformedPacket(f"IPv6 next header {buf[IP6_NEXT_HEADER]}, not TCP")
    if at < 0:
        raise MalformedPacket("an IPv6 packet whose TCP header cannot be reached (a "
                              "fragment, ESP, or cut short)")
    plen = U16.unpack_from(buf, IP6_PAYLOAD_LENGTH)[0]
    total = IP6_HEADER + plen if plen else n
    sport, dport, seq, ack, offflags, window, _tcsum, _urg = TCP_HDR.unpack_from(buf, at)
    thl = (offflags >> 12) * 4
    end = total if total <= n else n
    if thl < 20 or at + thl > end:
        raise MalformedPacket(f"bad TCP header length {thl}")
    return Packet(bytes(buf[IP6_SRC:IP6_SRC + 16]), bytes(buf[IP6_DST:IP6_DST + 16]), sport,
                  dport, seq, ack, offflags & 0x3F, window, bytes(buf[at + TCP.size:at + thl]),
                  bytes(buf[at + thl:end]), total)


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
    """TCP checksum over pseudo-header + segment (whose checksum field must be 0). The
    same sum serves both families: an IPv6 pseudo-header's 32-bit length and its
    addresses are, mod 0xFFFF, the numbers they make."""
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
          ttl: int = 64, flow: int = 0) -> bytearray:
    """A complete IPv4+TCP packet (4-byte addresses) or IPv6+TCP packet (16-byte ones, with
    the flow label ``flow`` and the hop limit ``ttl``) with a valid TCP checksum.

    The IPv4 checksum and ID are left 0: the kernel fills both for IPPROTO_RAW sockets.
    ``options`` must already be padded to a multiple of 4 bytes. The checksum is
    ``tcp_checksum``'s, summed from the fields themselves rather than from the packed
    header: only the options and the payload are read back as bytes.
    """
    olen = len(options)
    thl = 20 + olen
    tcp_len = thl + len(payload)
    offset_flags = (thl << 10) | flags
    if len(src) == 4:
        ip = 20
        a = int.from_bytes(src, "big")
        b = int.from_bytes(dst, "big")
        s = (a >> 16) + (a & 0xFFFF) + (b >> 16) + (b & 0xFFFF)
    else:
        # the pseudo-header's addresses, mod 0xFFFF like the words they are made of
        ip = IP6_HEADER
        s = (int.from_bytes(src, "big") + int.from_bytes(dst, "big")) % 0xFFFF
    s += (IPPROTO_TCP + tcp_len + sport + dport + (seq >> 16) + (seq & 0xFFFF) + (ack >> 16)
          + (ack & 0xFFFF) + offset_flags + window)
    if olen:
        s += _folded(options)
    if payload:
        s += _folded(payload)
    r = s % 0xFFFF
    # as in tcp_checksum: a sum of 0 mod 0xFFFF is 0xFFFF, whose complement is 0
    pkt = bytearray(ip + tcp_len)
    if ip == 20:
        IP_TCP.pack_into(pkt, 0, 0x45, 0, 20 + tcp_len, 0, IP_DF, ttl, IPPROTO_TCP, 0, src,
                         dst, sport, dport, seq, ack, offset_flags, window,
                         0xFFFF - r if r else 0, 0)
    else:
        IP6_TCP.pack_into(pkt, 0, 0x60000000 | (flow & 0xFFFFF), tcp_len, IPPROTO_TCP, ttl,
                          src, dst, sport, dport, seq, ack, offset_flags, window,
                          0xFFFF - r if r else 0, 0)
    if olen:
        pkt[ip + 20:ip + 20 + olen] = options
    if payload:
        pkt[ip + thl:] = payload
    return pkt
