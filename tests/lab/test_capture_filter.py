"""The capture socket's filter, run by the kernel: of a client's segments to a service
port it passes those with a payload, SYN, FIN or RST and leaves out pure ACKs (which move
nothing toward the target); interceptd's assistant filter (``source``) passes them all.
Loopback only: crafted segments to 127.0.0.1, matched by their sequence numbers."""
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


def _seen(port: int, source: bool) -> set[int]:
    """Sequence numbers of SEGMENTS (index = seq - 1000) that a capture socket on lo let
    through; segments go from port+1 to port (``source``: from port to port+1)."""
    cap = open_capture("lo", [port], None, rcvbuf=1 << 20, source=source)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        sport, dport = (port, port + 1) if source else (port + 1, port)
        for i, (_n, flags, opts, payload, _p) in enumerate(SEGMENTS):
            raw.sendto(P.build(LO, LO, sport, dport, 1000 + i, 1, flags, 1000, opts, payload),
                       ("127.0.0.1", 0))
        # a marker last: when it is read, everything sent before it has been filtered
        raw.sendto(P.build(LO, LO, sport, dport, 999, 0, P.SYN, 1000), ("127.0.0.1", 0))
        seen: set[int] = set()
        cap.settimeout(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            buf = cap.recv(65536)
            f = P.IP_TCP.unpack_from(buf, 0)
            if (f[10], f[11]) != (sport, dport):
                continue
            if f[12] == 999:
                return seen
            seen.add(f[12] - 1000)
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
