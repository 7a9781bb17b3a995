"""The capture socket's filter, run by the kernel: of a client's segments to a service
port it passes those with a payload, SYN, FIN or RST and leaves out pure ACKs (which move
nothing toward the target); interceptd's assistant filter (``source``) passes them all;
the same over IPv6, behind an extension header too. Loopback only: crafted segments to
127.0.0.1 and ::1, matched by their sequence numbers."""
from __future__ import annotations

import random
import socket
import time

import pytest

from tcpcopyd.net import packet as P
from tcpcopyd.net.capture import open_capture

pytestmark = pytest.mark.lab

LO = socket.inet_aton("127.0.0.1")
TS = P.timestamp_option(1, 0)
# (name, flags, options, payload, passes the client filter)
SEGMENTS = [
    ("syn", P.SYN, b"", b"", True),
    ("pure ack", P.ACK, b"", b"", False),
    ("pure ack with timestamps", P.ACK, TS, b"", False),
    ("data", P.ACK | P.PSH, b"", b"GET / HTTP/1.1\r\n\r\n", True),
    ("data with timestamps", P.ACK | P.PSH, TS, b"x", True),
    ("fin", P.ACK | P.FIN, b"", b"", True),
    ("rst", P.RST, b"", b"", True),
    ("rst ack with timestamps", P.RST | P.ACK, TS, b"", True),
]


LO6 = socket.inet_pton(socket.AF_INET6, "::1")


def behind(kind: int, pkt: bytes) -> bytes:
    """An IPv6/TCP packet with one extension header of ``kind`` (8 bytes, zeros: a
    fragment header's offset 0 and no more fragments) before its TCP header."""
    head = bytearray(pkt[:40])
    head[6] = kind
    head[4:6] = (len(pkt) - 32).to_bytes(2, "big")
    return bytes(head) + bytes((6, 0)) + bytes(6) + pkt[40:]


def _seen(port: int, source: bool, family: int = socket.AF_INET,
          extension: int | None = None, ipv6: bool | None = None,
          interfaces: list[int] | None = None, wait: float = 10.0) -> set[int]:
    """Sequence numbers of SEGMENTS (index = seq - 1000) that a capture socket on lo let
    through; segments go from port+1 to port (``source``: from port to port+1); IPv6 ones
    with ``family``, behind an ``extension`` header if given; ``ipv6``: the socket's (by
    default, whether the segments are); ``interfaces``: a socket of a set of interfaces
    (bound to none), taking those."""
    v6 = family == socket.AF_INET6
    cap = open_capture("lo", [port], None, rcvbuf=1 << 20, source=source,
                       ipv6=v6 if ipv6 is None else ipv6, interfaces=interfaces)
    raw = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
    lo, to = (LO6, ("::1", 0)) if v6 else (LO, ("127.0.0.1", 0))

    def send(pkt: bytes) -> None:
        raw.sendto(pkt if extension is None else behind(extension, pkt), to)
    try:
        sport, dport = (port, port + 1) if source else (port + 1, port)
        for i, (_n, flags, opts, payload, _p) in enumerate(SEGMENTS):
            send(bytes(P.build(lo, lo, sport, dport, 1000 + i, 1, flags, 1000, opts,
                               payload)))
        # a marker last: when it is read, everything sent before it has been filtered
        send(bytes(P.build(lo, lo, sport, dport, 999, 0, P.SYN, 1000)))
        seen: set[int] = set()
        cap.settimeout(wait)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                buf = cap.recv(65536)
            except TimeoutError:
                break
            p = P.parse(buf)
            if (p.sport, p.dport) != (sport, dport):
                continue
            if p.seq == 999:
                return seen
            seen.add(p.seq - 1000)
        raise AssertionError("the marker segment never came through")
    finally:
        cap.close()
        raw.close()


def test_client_filter_leaves_out_pure_acks():
    port = random.randrange(20000, 30000)
    seen = _seen(port, source=False)
    assert {SEGMENTS[i][0] for i in seen} == {n for n, *_r, passes in SEGMENTS if passes}


def test_assistant_filter_passes_every_segment():
    port = random.randrange(30000, 40000)
    assert _seen(port, source=True) == set(range(len(SEGMENTS)))


@pytest.mark.parametrize("extension", [None, P.IP6_HOP_BY_HOP, P.IP6_DEST_OPTIONS,
                                       P.IP6_FRAGMENT])
def test_the_ipv6_filter_leaves_out_pure_acks_behind_an_extension_header_too(extension):
    port = random.randrange(40000, 45000)
    seen = _seen(port, source=False, family=socket.AF_INET6, extension=extension)
    assert {SEGMENTS[i][0] for i in seen} == {n for n, *_r, passes in SEGMENTS if passes}


def test_the_ipv6_assistant_filter_passes_every_segment():
    port = random.randrange(45000, 50000)
    assert _seen(port, source=True, family=socket.AF_INET6) == set(range(len(SEGMENTS)))


def test_a_socket_of_both_families_filters_ipv4_as_before():
    port = random.randrange(50000, 55000)
    seen = _seen(port, source=False, ipv6=True)
    assert {SEGMENTS[i][0] for i in seen} == {n for n, *_r, passes in SEGMENTS if passes}


def test_a_socket_of_a_set_of_interfaces_takes_theirs_only():
    """-i 'eth0,veth*': the socket is bound to no interface, its filter takes the packets
    of the interfaces the set matches (their indexes) and no other's."""
    port = random.randrange(55000, 60000)
    lo, absent = socket.if_nametoindex("lo"), 2 ** 31 - 1
    seen = _seen(port, source=False, interfaces=[absent, lo])
    assert {SEGMENTS[i][0] for i in seen} == {n for n, *_r, passes in SEGMENTS if passes}
    with pytest.raises(AssertionError, match="marker"):
        _seen(port + 1, source=False, interfaces=[absent], wait=2)
    with pytest.raises(AssertionError, match="marker"):
        _seen(port + 2, source=False, interfaces=[], wait=2)
