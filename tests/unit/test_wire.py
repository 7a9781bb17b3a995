import pytest

from tcpcopyd.net import wire

CIP = bytes([198, 18, 1, 1])
TIP = bytes([198, 18, 2, 2])


def test_version_message_literal():
    assert wire.version_message() == bytes.fromhex("00000000" "0000" "0006" "00000000" "0000")


def test_client_add_literal():
    msg = wire.client_message(wire.CLIENT_ADD, CIP, 46000, TIP, 80)
    assert msg == bytes.fromhex("c6120101" "b3b0" "0001" "c6120202" "0050")
    assert len(msg) == wire.CLIENT_MSG_SIZE == 14


def test_parse_client_messages_keeps_partial():
    buf = bytearray(wire.version_message()
                    + wire.client_message(wire.CLIENT_DEL, CIP, 1, TIP, 2) + b"\xc6\x12")
    msgs = wire.parse_client_messages(buf)
    assert msgs == [(wire.VERSION, b"\0" * 4, 0, b"\0" * 4, 0), (wire.CLIENT_DEL, CIP, 1, TIP, 2)]
    assert buf == bytearray(b"\xc6\x12")


def _ip_tcp(ihl_words=5, tcp_len=32, payload=100):
    ip_opts = bytes((ihl_words - 5) * 4)
    tot = ihl_words * 4 + tcp_len + payload
    ip = bytes([0x40 | ihl_words, 0]) + tot.to_bytes(2, "big") + bytes(5) + b"\x06" \
        + bytes(2) + TIP + CIP + ip_opts
    tcp = (80).to_bytes(2, "big") + (46000).to_bytes(2, "big") + bytes(8) \
        + bytes([(tcp_len // 4) << 4, 0x18]) + bytes(tcp_len - 14)
    return ip + tcp + bytes(payload)


def test_reply_header_is_64_bytes_and_pads_short_tcp_headers():
    h = wire.reply_header(_ip_tcp(tcp_len=20, payload=0))
    assert len(h) == wire.REPLY_SIZE
    assert h[40:] == bytes(24)


def test_reply_header_cuts_long_tcp_headers_and_keeps_total_length():
    pkt = _ip_tcp(tcp_len=60, payload=1000)
    h = wire.reply_header(pkt)
    assert len(h) == 64
    assert int.from_bytes(h[2:4], "big") == 20 + 60 + 1000


def test_reply_header_strips_ip_options():
    pkt = _ip_tcp(ihl_words=7, tcp_len=20, payload=10)
    h = wire.reply_header(pkt)
    assert h[0] == 0x45
    assert int.from_bytes(h[2:4], "big") == 20 + 20 + 10
    assert h[20:22] == (80).to_bytes(2, "big")


def test_combined_frames_round_trip_in_pieces():
    headers = [bytes([i]) * 64 for i in range(40)]
    stream = wire.combine(headers)
    # 16 + 16 + 8
    assert stream[:2] == b"\x00\x10"
    assert len(stream) == 3 * 2 + 40 * 64
    buf, got = bytearray(), []
    for i in range(0, len(stream), 100):
        buf += stream[i:i + 100]
        got += wire.split_combined(buf)
    assert got == headers
    assert buf == bytearray()


@pytest.mark.parametrize("count", [0, 17])
def test_bad_combined_count_is_a_protocol_error(count):
    buf = bytearray(count.to_bytes(2, "big") + bytes(64 * 17))
    with pytest.raises(wire.ProtocolError):
        wire.split_combined(buf)


def test_too_short_reply_packet():
    with pytest.raises(wire.ProtocolError):
        wire.reply_header(b"\x45" + bytes(20))


def test_interceptd_refuses_a_peer_of_another_protocol_version():
    import socket

    from interceptd import counters as IC
    from interceptd.control import Peer
    from interceptd.router import Router
    r = Router([0] * len(IC.NAMES))
    peer = Peer(socket.socket(), "test")
    try:
        [(kind, cip, cport, _, _)] = wire.parse_client_messages(
            bytearray(bytes.fromhex("00000000" "0000" "0005" "00000000" "0000")))
        with pytest.raises(wire.ProtocolError, match="speaks protocol version 5"):
            r.on_message(peer, kind, cip, cport, 1.0)
    finally:
        peer.sock.close()


# ---------------------------------------------------------------- IPv6 (FEATURE_IPV6)
C6 = bytes.fromhex("fd180001000000000000000000000001")
T6 = bytes.fromhex("fd180002000000000000000000000002")


def test_an_ipv6_registration_is_three_messages_of_its_type():
    msgs = wire.registration6(wire.CLIENT_ADD6, C6, 46000, T6, 80)
    assert len(msgs) == wire.REGISTRATION6_PARTS * wire.CLIENT_MSG_SIZE
    parsed = wire.parse_client_messages(bytearray(msgs))
    assert {m[0] for m in parsed} == {wire.CLIENT_ADD6}
    parts = b"".join(wire.proof_part(*m[1:]) for m in parsed)
    assert wire.registration6_fields(parts) == (C6, 46000, T6, 80)


def _ip6_tcp(ext: bytes = b"", tcp_len: int = 32, payload: int = 100) -> bytes:
    from tcpcopyd.net import packet as P
    pkt = bytes(P.build(T6, C6, 80, 46000, 7, 8, P.ACK | P.PSH, 500,
                        bytes(tcp_len - 20), bytes(range(payload))))
    if not ext:
        return pkt
    head = bytearray(pkt[:40])
    head[6] = 60                             # destination options, then TCP
    head[4:6] = (len(pkt) - 40 + len(ext)).to_bytes(2, "big")
    return bytes(head) + ext + pkt[40:]


def test_an_ipv6_reply_header_loses_its_extension_headers_and_keeps_its_lengths():
    plain = wire.reply_header(_ip6_tcp())
    assert len(plain) == wire.REPLY6_SIZE and wire.is_v6(plain)
    dest_options = bytes((6, 1)) + bytes(14)     # 16 bytes, next header TCP
    cut = wire.reply_header(memoryview(_ip6_tcp(dest_options)))
    assert cut == plain
    assert int.from_bytes(cut[4:6], "big") == 32 + 100 and cut[6] == 6
    assert wire.reply_record(_ip6_tcp(dest_options), 10) == plain + bytes(range(10))
    with pytest.raises(wire.ProtocolError):
        wire.reply_header(_ip6_tcp()[:50])


def test_ipv6_frames_travel_between_combined_frames_in_order():
    v4 = wire.reply_header(_ip_tcp())
    v6 = wire.reply_record(_ip6_tcp(), 5)
    framed = wire.combine([v4, v6, v4], payload=False)
    got = wire.split_combined(bytearray(framed), extensions=[])
    assert got == [v4, v6[:wire.REPLY6_SIZE], v4]
    framed = wire.combine([v6], payload=True)
    assert wire.split_combined(bytearray(framed), extensions=[]) == [v6]
    # a frame cut short waits for the rest; a peer that offered nothing never takes one
    buf = bytearray(framed[:-1])
    assert wire.split_combined(buf, extensions=[]) == [] and len(buf) == len(framed) - 1
    with pytest.raises(wire.ProtocolError):
        wire.split_combined(bytearray(framed))
    bad = bytearray(framed)
    bad[4] = 0x45                             # not an IPv6 header
    with pytest.raises(wire.ProtocolError):
        wire.split_combined(bad, extensions=[])
