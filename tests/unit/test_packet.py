import socket
import struct

import pytest

from tcpcopyd.net import packet as P

# A SYN laid out as Linux sends one (198.18.1.1:46000 -> 198.18.1.2:80), IP checksum 0
SYN = bytes.fromhex(
    "4500003c0000400040060000c6120101c6120102"  # IPv4, total 60, DF, TTL 64, TCP
    "b3b00050" "0a0b0c0d" "00000000" "a002faf0" "0000" "0000"  # ports, seq, ack, off=10 SYN
    "020405b40402080a0001e24000000000" "01030307")


def ones_complement_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def reference_tcp_checksum(src: bytes, dst: bytes, seg: bytes) -> int:
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(seg))
    return (~ones_complement_sum(pseudo + seg)) & 0xFFFF


@pytest.mark.parametrize("size", [0, 1, 7, 150, 1460, 1461])
def test_checksum_matches_reference(size):
    src, dst = socket.inet_aton("198.18.1.1"), socket.inet_aton("198.18.2.2")
    payload = bytes((i * 7 + 3) & 0xFF for i in range(size))
    pkt = P.build(src, dst, 40000, 80, 123456, 654321, P.ACK | P.PSH, 502, b"", payload)
    seg = bytearray(pkt[20:])
    got = int.from_bytes(seg[16:18], "big")
    seg[16:18] = b"\0\0"
    assert got == reference_tcp_checksum(src, dst, bytes(seg))
    # and a receiver's check: the sum over the segment including its checksum is 0xffff
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(pkt) - 20)
    assert ones_complement_sum(pseudo + bytes(pkt[20:])) == 0xFFFF


def built_checksum_is_right(pkt: bytearray) -> bool:
    src, dst = bytes(pkt[12:16]), bytes(pkt[16:20])
    seg = bytearray(pkt[20:])
    got = int.from_bytes(seg[16:18], "big")
    seg[16:18] = b"\0\0"
    return got == reference_tcp_checksum(src, dst, bytes(seg)) == P.tcp_checksum(src, dst, seg)


def test_built_checksums_match_the_reference_for_any_fields():
    # build() sums the header from its fields; the reference sums the packed bytes
    import random
    rng = random.Random(20)
    for _ in range(3000):
        options = bytes(rng.randrange(256) for _ in range(4 * rng.randrange(11)))
        payload = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 2, 3, 77, 1460,
                                                                         rng.randrange(1600)))))
        pkt = P.build(rng.randbytes(4), rng.randbytes(4), rng.randrange(65536),
                      rng.randrange(65536), rng.randrange(1 << 32), rng.randrange(1 << 32),
                      rng.randrange(64), rng.randrange(65536), options,
                      memoryview(payload) if rng.random() < 0.3 else payload)
        assert built_checksum_is_right(pkt)


def test_a_built_segment_whose_sum_is_zero_gets_checksum_zero():
    src = dst = b"\0\0\0\0"
    # the window completes the sum to 0xffff: protocol 6, length 20, offset word 0x5000
    pkt = P.build(src, dst, 0, 0, 0, 0, 0, 0xFFFF - 6 - 20 - 0x5000)
    assert pkt[36:38] == b"\0\0" and built_checksum_is_right(pkt)


def test_checksum_of_zero_sum_block():
    # a segment whose ones'-complement sum is 0xffff must get checksum 0x0000
    src = dst = b"\0\0\0\0"
    seg = bytearray(20)
    # choose a word so the total (incl. pseudo-header proto 6 + length 20) is 0xffff
    struct.pack_into("!H", seg, 0, 0xFFFF - 6 - 20)
    assert P.tcp_checksum(src, dst, bytes(seg)) == 0


def test_parse_literal_syn():
    s = P.parse(SYN)
    assert socket.inet_ntoa(s.src) == "198.18.1.1"
    assert socket.inet_ntoa(s.dst) == "198.18.1.2"
    assert (s.sport, s.dport, s.seq, s.ack) == (46000, 80, 0x0A0B0C0D, 0)
    assert s.flags == P.SYN
    assert s.window == 64240
    opts = P.parse_options(s.options)
    assert int.from_bytes(opts[P.OPT_MSS], "big") == 1460
    assert opts[P.OPT_WSCALE] == b"\x07"
    assert P.OPT_SACK_PERM in opts
    assert P.timestamp_of(s.options) == (0x1E240, 0)
    assert s.payload == b""


@pytest.mark.parametrize("bad,reason", [
    (SYN[:30], "shorter"),
    (b"\x55" + SYN[1:], "version"),
    (SYN[:9] + b"\x11" + SYN[10:], "protocol"),
    (SYN[:6] + b"\x20\x10" + SYN[8:], "fragment"),
    (SYN[:32] + b"\x10\x02" + SYN[34:], "TCP header length"),
])
def test_parse_rejects_malformed(bad, reason):
    with pytest.raises(P.MalformedPacket, match=reason):
        P.parse(bad)


def test_build_parse_round_trip_with_options_and_payload():
    src, dst = socket.inet_aton("198.18.1.1"), socket.inet_aton("198.18.2.2")
    opts = P.timestamp_option(111, 222)
    pkt = P.build(src, dst, 1234, 80, 0xFFFFFFF0, 5, P.ACK | P.FIN, 1000, opts, b"hello")
    s = P.parse(pkt)
    assert (s.sport, s.dport, s.seq, s.ack, s.flags, s.window) == \
        (1234, 80, 0xFFFFFFF0, 5, P.ACK | P.FIN, 1000)
    assert s.payload == b"hello"
    assert P.timestamp_of(s.options) == (111, 222)
    assert pkt[6] & 0x40  # DF


def test_sequence_arithmetic_wraps():
    assert P.seq_lt(0xFFFFFFF0, 5)
    assert not P.seq_lt(5, 0xFFFFFFF0)
    assert P.seq_le(7, 7)
    assert P.seq_add(0xFFFFFFFF, 2) == 1
    assert P.seq_diff(3, 0xFFFFFFFE) == 5
    assert P.seq_diff(0xFFFFFFFE, 3) == -5


def test_options_parser_stops_on_garbage():
    assert P.parse_options(b"\x02\x00\x05\xb4") == {}           # length 0
    assert P.parse_options(b"\x02\x04\x05") == {}               # truncated
    assert P.parse_options(b"\x01\x01\x00\x02\x04\x05\xb4") == {}  # after EOL


# ---------------------------------------------------------------- IPv6
C6 = socket.inet_pton(socket.AF_INET6, "fd18:1::1")
T6 = socket.inet_pton(socket.AF_INET6, "fd18:2::2")


def reference_tcp6_checksum(src: bytes, dst: bytes, seg: bytes) -> int:
    pseudo = src + dst + struct.pack("!IxxxB", len(seg), 6)       # RFC 8200, 8.1
    return (~ones_complement_sum(pseudo + seg)) & 0xFFFF


def test_built_ipv6_packets_have_the_reference_checksum_and_header():
    import random
    rng = random.Random(6)
    for _ in range(2000):
        src, dst = rng.randbytes(16), rng.randbytes(16)
        options = bytes(rng.randrange(256) for _ in range(4 * rng.randrange(11)))
        payload = rng.randbytes(rng.choice((0, 1, 3, 1440, rng.randrange(1500))))
        flow = rng.randrange(1 << 20)
        pkt = P.build(src, dst, rng.randrange(65536), rng.randrange(65536),
                      rng.randrange(1 << 32), rng.randrange(1 << 32), rng.randrange(64),
                      rng.randrange(65536), options, payload, ttl=61, flow=flow)
        head = P.IPV6.unpack(bytes(pkt[:40]))
        assert head.version_class_flow == 0x60000000 | flow
        assert head.payload_length == len(pkt) - 40 and head.next_header == 6
        assert head.hop_limit == 61 and (head.src, head.dst) == (src, dst)
        seg = bytearray(pkt[40:])
        got = int.from_bytes(seg[16:18], "big")
        seg[16:18] = b"\0\0"
        assert got == reference_tcp6_checksum(src, dst, bytes(seg)) \
            == P.tcp_checksum(src, dst, seg)
        p = P.parse(bytes(pkt))
        assert (p.src, p.dst, p.options, p.payload, p.ip_len) == (src, dst, options, payload,
                                                                   len(pkt))


def with_extensions(pkt: bytes, *headers: tuple[int, bytes]) -> bytes:
    """``pkt`` (IPv6+TCP) with extension headers (number, body after its first two bytes)
    between its IPv6 header and its TCP header."""
    chain = b""
    kinds = [h[0] for h in headers] + [6]
    for (_, body), nxt in zip(headers, kinds[1:], strict=True):
        chain += bytes((nxt, (len(body) + 2) // 8 - 1)) + body
    head = bytearray(pkt[:40])
    head[6] = kinds[0]
    struct.pack_into("!H", head, 4, len(pkt) - 40 + len(chain))
    return bytes(head) + chain + pkt[40:]


def test_the_tcp_header_is_found_behind_the_extension_headers_a_stack_may_send():
    pkt = bytes(P.build(C6, T6, 40000, 80, 1, 2, P.ACK | P.PSH, 500, b"", b"GET /"))
    assert P.tcp_offset6(pkt, len(pkt)) == 40
    hop = (P.IP6_HOP_BY_HOP, bytes(6))                 # a PadN, 8 bytes in all
    dest = (P.IP6_DEST_OPTIONS, bytes(14))             # 16 bytes
    atomic = (P.IP6_FRAGMENT, bytes(6))                # offset 0, no more: the whole segment
    ext = with_extensions(pkt, hop, dest, atomic)
    assert P.tcp_offset6(ext, len(ext)) == 40 + 8 + 16 + 8
    p = P.parse(ext)
    assert (p.sport, p.dport, p.payload) == (40000, 80, b"GET /")
    assert P.segment_span(ext, len(ext))[6:] == (len(ext) - 5, len(ext))


@pytest.mark.parametrize("headers, why", [
    ([(P.IP6_FRAGMENT, b"\0\x01" + bytes(4))], P.NOT_FOLLOWED),    # more fragments come
    ([(P.IP6_FRAGMENT, b"\x05\x00" + bytes(4))], P.NOT_FOLLOWED),  # not the first one
    ([(P.IP6_DEST_OPTIONS, bytes(6))] * 9, P.NOT_FOLLOWED),        # a chain too long
    ([(58, bytes(6))], P.NOT_TCP),                                 # ICMPv6
])
def test_what_cannot_be_followed_is_said(headers, why):
    pkt = with_extensions(bytes(P.build(C6, T6, 1, 80, 1, 2, P.ACK, 5, b"", b"x")), *headers)
    assert P.tcp_offset6(pkt, len(pkt)) == why
    with pytest.raises(P.MalformedPacket):
        P.parse(pkt)
    assert P.segment_span(pkt, len(pkt)) is None


def test_an_ipv6_packet_cut_short_is_malformed_never_an_error():
    pkt = with_extensions(bytes(P.build(C6, T6, 1, 80, 1, 2, P.ACK, 5, b"", b"x")),
                          (P.IP6_HOP_BY_HOP, bytes(6)))
    for n in range(len(pkt)):
        assert P.tcp_offset6(pkt, n) in (P.NOT_FOLLOWED, 48)
        if n < 48 + 20:
            with pytest.raises(P.MalformedPacket):
                P.parse(pkt[:n])
