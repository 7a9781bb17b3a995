"""The session engine over IPv6, and over both families at once: what it does for IPv4
(tests/unit/test_engine.py) with 128-bit addresses, extension headers and IPv6's own
header sizes."""
import socket

import pytest

from tcpcopyd.net import packet as P
from tcpcopyd.net import wire
from tcpcopyd.online import counters as C
from tcpcopyd.online.engine import Engine
from tcpcopyd.online.targets import ANY6
from tests.unit.test_packet import with_extensions

CLIENT = socket.inet_pton(socket.AF_INET6, "fd18:1::1")
ONLINE = socket.inet_pton(socket.AF_INET6, "fd18:1::2")
TARGET = socket.inet_pton(socket.AF_INET6, "fd18:2::2")
CLIENT4 = socket.inet_aton("198.18.1.1")
ONLINE4 = socket.inet_aton("198.18.1.2")
TARGET4 = socket.inet_aton("198.18.2.2")
CPORT = 40000
ISN = 1000
ONLINE_ISN = 5_000_000
TARGET_ISN = 9_000_000
SYN_OPTS = P.syn_options(1440, 7, True, (777, 0))
SYNACK_OPTS = P.syn_options(1440, 7, True, (3333, 777))


class Sender:
    """Keeps what the engine sends, checked on the way: the family of its destination,
    the header fields a stack would set, the TCP checksum."""

    def __init__(self):
        self.sent: list[tuple[P.Packet, int]] = []

    def send(self, pkt, dst):
        raw = bytes(pkt)
        p = P.parse(raw)
        assert p.dst == dst
        seg = bytearray(raw[len(raw) - (p.ip_len - (40 if len(dst) == 16 else 20)):])
        got = int.from_bytes(seg[16:18], "big")
        seg[16:18] = b"\0\0"
        assert got == P.tcp_checksum(p.src, p.dst, seg)
        flow = int.from_bytes(raw[:4], "big") & 0xFFFFF if len(dst) == 16 else None
        if len(dst) == 16:
            assert raw[0] >> 4 == 6 and raw[6] == 6 and raw[7] == 64
        self.sent.append((p, flow))
        return True

    def take(self):
        out, self.sent = [p for p, _ in self.sent], []
        return out


class Control:
    up = True

    def __init__(self):
        self.log = []

    def register(self, s):
        self.log.append(("add", s.client_ip, s.client_port))

    def unregister(self, s):
        self.log.append(("del", s.client_ip, s.client_port))

    def flush(self, now):
        pass

    def carries(self, s):
        return True


def client_pkt(seq, ack, flags, payload=b"", options=b"", src=CLIENT, dst=ONLINE):
    return bytes(P.build(src, dst, CPORT, 80, seq, ack, flags, 502, options, payload,
                         flow=0x12345))


def reply(seq, ack, flags, payload_len=0, options=b"", src=TARGET, dst=CLIENT):
    return wire.reply_header(P.build(src, dst, 80, CPORT, seq, ack, flags, 65535, options,
                                     bytes(payload_len)))


@pytest.fixture
def eng():
    return Engine({(ANY6, 80): (TARGET, 80), 80: (TARGET4, 80)}, Sender(), Control(), None,
                  range(100))


def feed(e, pkt, now=100.0):
    e.on_client_packet(pkt, len(pkt), now)
    e.flush(now)


def answer(e, hdr, now=100.0):
    e.on_reply(hdr, now)
    e.flush(now)


def test_an_ipv6_session_is_copied_from_syn_to_close(eng):
    feed(eng, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS))
    assert eng.control.log == [("add", CLIENT, CPORT)]
    [syn] = eng.sender.take()
    assert (syn.src, syn.dst, syn.sport, syn.dport, syn.seq) == (CLIENT, TARGET, CPORT, 80,
                                                                  ISN)
    answer(eng, reply(TARGET_ISN, ISN + 1, P.SYN | P.ACK, options=SYNACK_OPTS))
    s = eng.sessions[(CLIENT, CPORT, TARGET, 80)]
    assert s.mss == 1500 - 60 - 12          # IPv6's header is 40 bytes
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"GET / HTTP/1.1\r\n\r\n"))
    [data] = eng.sender.take()
    assert (data.seq, data.ack, data.payload) == (ISN + 1, TARGET_ISN + 1,
                                                  b"GET / HTTP/1.1\r\n\r\n")
    answer(eng, reply(TARGET_ISN + 1, ISN + 19, P.ACK | P.PSH | P.FIN, payload_len=100))
    eng.sender.take()
    feed(eng, client_pkt(ISN + 19, ONLINE_ISN + 102, P.ACK | P.FIN))
    [rst] = eng.sender.take()
    assert rst.flags & P.RST and not eng.sessions
    assert eng.control.log[-1] == ("del", CLIENT, CPORT)
    assert eng.counters[C.INDEX["sessions_closed"]] == 1


def test_every_packet_of_a_connection_has_its_one_flow_label(eng):
    feed(eng, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS))
    answer(eng, reply(TARGET_ISN, ISN + 1, P.SYN | P.ACK, options=SYNACK_OPTS))
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"x" * 5000))
    eng.tick(101.0)
    flows = {f for _, f in eng.sender.sent}
    assert len(eng.sender.sent) >= 5 and len(flows) == 1 and flows != {0}


def test_large_ipv6_frames_are_cut_to_the_mss(eng):
    eng.mtu = 1280                           # the least an IPv6 link carries
    feed(eng, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS))
    answer(eng, reply(TARGET_ISN, ISN + 1, P.SYN | P.ACK, options=SYNACK_OPTS))
    eng.sender.take()
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK, b"q" * 5000))
    sent = eng.sender.take()
    assert sum(len(p.payload) for p in sent) == 5000
    assert max(p.ip_len for p in sent) <= 1280


def test_both_families_at_once_each_to_the_rule_of_its_own(eng):
    feed(eng, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS))
    feed(eng, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS, src=CLIENT4, dst=ONLINE4))
    six, four = eng.sender.take()
    assert (six.dst, four.dst) == (TARGET, TARGET4)
    answer(eng, reply(TARGET_ISN, ISN + 1, P.SYN | P.ACK, options=SYNACK_OPTS))
    answer(eng, reply(TARGET_ISN, ISN + 1, P.SYN | P.ACK, options=SYNACK_OPTS, src=TARGET4,
                      dst=CLIENT4))
    assert {k[0] for k in eng.sessions} == {CLIENT, CLIENT4}
    assert all(s.rcv_nxt == TARGET_ISN + 1 for s in eng.sessions.values())
    # an IPv6 packet to a port only an IPv4 rule copies is no one's
    only4 = Engine({80: (TARGET4, 80)}, Sender(), Control(), None, range(4))
    feed(only4, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS))
    assert only4.sender.take() == [] and only4.counters[C.NO_SESSION] == 1


def test_extension_headers_are_followed_and_fragments_counted_and_skipped(eng):
    syn = with_extensions(client_pkt(ISN, 0, P.SYN, options=SYN_OPTS),
                          (P.IP6_HOP_BY_HOP, bytes(6)), (P.IP6_DEST_OPTIONS, bytes(6)))
    feed(eng, syn)
    [out] = eng.sender.take()
    assert out.flags == P.SYN and out.options == SYN_OPTS
    answer(eng, reply(TARGET_ISN, ISN + 1, P.SYN | P.ACK, options=SYNACK_OPTS))
    fragment = with_extensions(client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK, b"part"),
                               (P.IP6_FRAGMENT, b"\0\x01" + bytes(4)))
    feed(eng, fragment)
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK, b"x")[:50])   # cut short
    assert eng.counters[C.NOT_FOLLOWED] == 2
    assert [p for p in eng.sender.take() if p.payload] == []


def test_a_reply_record_with_its_answers_first_bytes_is_read_as_such(eng):
    feed(eng, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS))
    answer(eng, reply(TARGET_ISN, ISN + 1, P.SYN | P.ACK, options=SYNACK_OPTS))
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"GET /"))
    eng.sender.take()
    full = P.build(TARGET, CLIENT, 80, CPORT, TARGET_ISN + 1, ISN + 6, P.ACK | P.PSH, 65535,
                   b"", b"HTTP/1.1 200 OK\r\n")
    answer(eng, wire.reply_record(full, 8))
    s = eng.sessions[(CLIENT, CPORT, TARGET, 80)]
    assert s.rcv_nxt == TARGET_ISN + 1 + 17      # the payload length, not the prefix's
    assert eng.counters[C.REPLIES_MALFORMED] == 0


def test_a_new_worker_carries_ipv6_and_ipv4_sessions_on_from_the_shm_table(slot_table):
    targets = {(ANY6, 80): (TARGET, 80), 80: (TARGET4, 80)}
    old = Engine(targets, Sender(), Control(), slot_table, range(16))
    for c, o, t in ((CLIENT, ONLINE, TARGET), (CLIENT4, ONLINE4, TARGET4)):
        feed(old, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS, src=c, dst=o))
        answer(old, reply(TARGET_ISN, ISN + 1, P.SYN | P.ACK, options=SYNACK_OPTS, src=t,
                          dst=c))
        feed(old, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"req1", src=c, dst=o))
        answer(old, reply(TARGET_ISN + 1, ISN + 5, P.ACK | P.PSH, payload_len=30, src=t,
                          dst=c))
    old.sync_table()
    flow = old.sessions[(CLIENT, CPORT, TARGET, 80)].flow
    new = Engine(targets, Sender(), Control(), slot_table, range(16))
    assert new.restore(200.0) == 2
    assert set(new.sessions) == set(old.sessions)
    feed(new, client_pkt(ISN + 5, ONLINE_ISN + 100, P.ACK | P.PSH, b"req2"))
    [(data, label)] = new.sender.sent
    assert (data.dst, data.seq, data.ack, data.payload) == (TARGET, ISN + 5, TARGET_ISN + 31,
                                                            b"req2")
    assert label == flow
