"""Mirror mode before the engine (tcpcopyd.online.mirror): a mirror's second copy of a
packet skipped, a client's retransmission not; cut packets counted and their data used;
gaps, duplicates and cut packets counted per mirror source; those counts through the shm
record to status."""
import socket

import pytest

from shm import segment as shmseg
from tcpcopyd.health.status import mirror_table
from tcpcopyd.net import packet as P
from tcpcopyd.online import counters as C
from tcpcopyd.online.engine import Engine
from tcpcopyd.online.mirror import MirrorWatch
from tests.unit.test_engine import (
    CLIENT,
    ISN,
    ONLINE_ISN,
    TARGET,
    FakeControl,
    FakeSender,
    client_pkt,
    handshake,
)

ONLINE_TEXT = "198.18.1.2"


def with_id(pkt: bytearray, ip_id: int) -> bytearray:
    """The packet as the client's kernel sent it: its IPv4 identification (build leaves
    it 0, the raw socket fills it)."""
    pkt[4:6] = ip_id.to_bytes(2, "big")
    return pkt


@pytest.fixture
def eng():
    return Engine({80: (TARGET, 80)}, FakeSender(), FakeControl(), None, range(100))


def mirrored(eng):
    watch = MirrorWatch(eng.on_client_packet, eng.counters)

    def feed(pkt, now=100.0):
        watch.packet(pkt, len(pkt), now)
        eng.flush(now)
    return watch, feed


def test_the_same_packet_twice_is_skipped_a_retransmission_is_not(eng):
    watch, feed = mirrored(eng)
    handshake(eng)
    eng.sender.take()
    data = with_id(client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK, b"GET / HTTP/1.1\r\n\r\n"), 7)
    feed(data)
    twice = bytearray(data)
    twice[8] -= 1           # one router more on the way of the second copy: another TTL
    feed(twice)
    assert [p.payload for p in eng.sender.take() if p.payload] == [b"GET / HTTP/1.1\r\n\r\n"]
    assert eng.counters[C.MIRROR_DUPLICATES] == 1
    # the client sent it again (a new identification): the engine sees it, as a duplicate
    feed(with_id(client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK, b"GET / HTTP/1.1\r\n\r\n"), 8))
    assert eng.counters[C.MIRROR_DUPLICATES] == 1 and eng.counters[C.DUPLICATE] == 1
    [source] = shmseg.unpack_sources(shmseg.pack_sources(watch.sources))
    assert (source.address, source.packets, source.duplicates) == (ONLINE_TEXT, 3, 1)


def test_a_cut_packet_is_counted_its_data_used_and_the_rest_is_a_gap(eng):
    watch, feed = mirrored(eng)
    handshake(eng)
    eng.sender.take()
    whole = with_id(client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK, b"A" * 100), 1)
    feed(whole[:len(whole) - 60])       # the mirror kept 40 bytes of its payload
    assert [p.payload for p in eng.sender.take() if p.payload] == [b"A" * 40]
    feed(with_id(client_pkt(ISN + 101, ONLINE_ISN + 1, P.ACK, b"B" * 10), 2))
    assert not [p for p in eng.sender.take() if p.payload]     # held beyond the gap
    assert eng.counters[C.TRUNCATED] == 1 and eng.counters[C.CAPTURE_GAPS] == 1
    [source] = shmseg.unpack_sources(shmseg.pack_sources(watch.sources))
    assert (source.packets, source.truncated, source.gaps) == (2, 1, 1)


def test_sources_are_bounded_the_rest_counted_together():
    seen = []
    counters = [0] * len(C.NAMES)
    watch = MirrorWatch(lambda buf, n, now: seen.append(n), counters)
    for i in range(40):
        online = socket.inet_aton(f"198.18.1.{i + 2}")
        pkt = P.build(CLIENT, online, 40000, 80, ISN, 0, P.SYN, 1000)
        watch.packet(pkt, len(pkt), 1.0)
    assert len(seen) == 40
    table = mirror_table(list(shmseg.unpack_sources(shmseg.pack_sources(watch.sources))))
    assert len(table) == shmseg.MAX_SOURCES
    others = [t for t in table if t["source"] == "others"]
    assert others[0]["packets"] == 40 - (shmseg.MAX_SOURCES - 1)
    assert sum(t["packets"] for t in table) == 40


def test_ipv6_duplicates_and_sources():
    client6, online6 = socket.inet_pton(socket.AF_INET6, "fd18:1::1"), \
        socket.inet_pton(socket.AF_INET6, "fd18:1::2")
    seen = []
    counters = [0] * len(C.NAMES)
    watch = MirrorWatch(lambda buf, n, now: seen.append(bytes(buf[:n])), counters)
    pkt = P.build(client6, online6, 40000, 80, ISN, 1, P.ACK, 1000, b"", b"x" * 10)
    other_hop = bytearray(pkt)
    other_hop[7] = 3
    for p in (pkt, other_hop, P.build(client6, online6, 40000, 80, ISN + 10, 1, P.ACK, 1000,
                                      b"", b"y" * 10)):
        watch.packet(p, len(p), 1.0)
    assert len(seen) == 2 and counters[C.MIRROR_DUPLICATES] == 1
    assert list(watch.sources) == [online6]


def test_junk_goes_to_the_engine_untouched():
    seen = []
    counters = [0] * len(C.NAMES)
    watch = MirrorWatch(lambda buf, n, now: seen.append(n), counters)
    for junk in (b"", b"\x45" * 10, b"\x00" * 60, b"\x65" * 39):
        watch.packet(junk, len(junk), 1.0)
    assert seen == [0, 10, 60, 39] and not any(counters)



def test_a_gap_the_mirror_never_fills_resets_the_copy_and_the_next_data_reopens_it(eng):
    watch, feed = mirrored(eng)
    handshake(eng)
    eng.sender.take()
    feed(with_id(client_pkt(ISN + 11, ONLINE_ISN + 1, P.ACK, b"B" * 10), 1))   # A* lost
    eng.tick(100.0 + 6)
    assert eng.counters[C.INDEX["sessions_broken"]] == 1 and not eng.sessions
    assert [p.flags & P.RST for p in eng.sender.take()] == [P.RST]
    feed(with_id(client_pkt(ISN + 21, ONLINE_ISN + 1, P.ACK, b"GET /next HTTP/1.1\r\n\r\n"),
                 2), 106.5)
    assert eng.counters[C.SESSIONS_FAKE] == 1
    [syn] = eng.sender.take()
    assert syn.flags == P.SYN and syn.seq == ISN + 20
    [source] = shmseg.unpack_sources(shmseg.pack_sources(watch.sources))
    assert source.gaps == 1
