"""Garbage in: the engine and the router count it and carry on; they never raise."""
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from interceptd import counters as IC
from interceptd.control import Peer
from interceptd.router import Router
from tcpcopyd.net import packet as P
from tcpcopyd.net import wire
from tcpcopyd.online.engine import Engine
from tests.unit.test_engine import CLIENT, ONLINE, TARGET, FakeControl, FakeSender


class AnySender(FakeSender):
    def send(self, pkt, dst):
        P.parse(bytes(pkt))  # whatever we send is well-formed
        return True


def engine():
    return Engine({80: (TARGET, 80)}, AnySender(), FakeControl(), None, range(64))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_from_the_capture(junk):
    e = engine()
    e.on_client_packet(junk, len(junk), 1.0)
    e.flush(1.0)
    e.tick(100.0)


@settings(max_examples=300, deadline=None)
@given(flags=st.integers(0, 0x3F), seq=st.integers(0, 2**32 - 1), ack=st.integers(0, 2**32 - 1),
       win=st.integers(0, 0xFFFF), payload=st.binary(max_size=40), opts=st.binary(max_size=40),
       reply_flags=st.integers(0, 0x3F), rseq=st.integers(0, 2**32 - 1),
       rack=st.integers(0, 2**32 - 1), rlen=st.integers(0, 3000), ropts=st.binary(max_size=24))
def test_random_tcp_fields_both_ways(flags, seq, ack, win, payload, opts, reply_flags, rseq,
                                     rack, rlen, ropts):
    e = engine()
    opts = opts[: len(opts) // 4 * 4]
    ropts = ropts[: len(ropts) // 4 * 4]
    pkt = P.build(CLIENT, ONLINE, 40000, 80, seq, ack, flags, win, opts, payload)
    e.on_client_packet(pkt, len(pkt), 1.0)
    e.flush(1.0)
    rep = bytearray(wire.reply_header(P.build(TARGET, CLIENT, 80, 40000, rseq, rack,
                                              reply_flags, win, ropts, b"")))
    rep[2:4] = (20 + 20 + len(ropts) + rlen).to_bytes(2, "big")
    e.on_reply(bytes(rep), 1.5)
    e.flush(1.5)
    for t in (3.0, 10.0, 60.0, 500.0):
        e.tick(t)
    e.expire_idle(1000.0)
    assert not e.sessions
    assert e.buffered_total == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=64, max_size=64))
def test_random_reply_headers(h):
    e = engine()
    e.on_reply(h, 1.0)
    e.flush(1.0)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_control_messages_at_interceptd(data):
    cnt = [0] * len(IC.NAMES)
    r = Router(cnt)
    peer = Peer(socket.socket(), "test")
    try:
        buf = bytearray(data)
        try:
            for kind, cip, cport, _tip, _tport in wire.parse_client_messages(buf):
                r.on_message(peer, kind, cip, cport, 1.0)
        except wire.ProtocolError:
            r.drop_peer(peer)   # what the worker does: a peer of another version is dropped
        r.route(bytes(64), 1.0)
        r.retry_delayed(10.0)
        r.frame(peer)
    finally:
        peer.sock.close()
