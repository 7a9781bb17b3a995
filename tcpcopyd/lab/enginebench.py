"""The cost of the engine, in microseconds of this machine's CPU: a whole short session (the
common case: every packet of it, both ways), and the worst cases: a SYN on an empty session
table against one on a full table (every session idle, or every one with data in flight),
and a segment in order while many are held out of order. Medians of several rounds.

    python -m tcpcopyd.lab.enginebench [--slots 65536] [--rounds 5]
"""
from __future__ import annotations

import argparse
import logging
import socket
import statistics
import sys
import time

from tcpcopyd.lab.fuzz import NoControl
from tcpcopyd.net import packet as P
from tcpcopyd.net import wire
from tcpcopyd.online.engine import Engine

CLIENT = socket.inet_aton("198.18.1.1")
OTHER = socket.inet_aton("198.18.1.9")
ONLINE = socket.inet_aton("198.18.1.2")
TARGET = socket.inet_aton("198.18.2.2")
SYN_OPTS = P.syn_options(1460, 7, True, (1, 0))


class NoSender:
    def send(self, pkt: bytearray, dst: bytes) -> bool:
        return True


def _engine(slots: int) -> Engine:
    return Engine({80: (TARGET, 80)}, NoSender(), NoControl(), None, range(slots))


def _syn(src: bytes, port: int) -> bytes:
    return bytes(P.build(src, ONLINE, port, 80, 1000, 0, P.SYN, 64240, SYN_OPTS))


def _feed(e: Engine, pkt: bytes, now: float = 1.0) -> None:
    e.on_client_packet(pkt, len(pkt), now)
    e.flush(now)


def syn_cost(slots: int, fill: str, n: int = 2000) -> float:
    """µs per SYN: ``fill`` "none" (empty table), "idle" or "busy" (full table)."""
    e = _engine(slots)
    if fill != "none":
        for i in range(slots):
            port = 1024 + i % 60000
            src = bytes([198, 18, 3, i // 60000])
            _feed(e, bytes(P.build(src, ONLINE, port, 80, 1000, 0, P.SYN, 64240, SYN_OPTS)))
            if fill == "busy":
                _feed(e, bytes(P.build(src, ONLINE, port, 80, 1001, 1, P.ACK, 502, b"",
                                       b"GET / HTTP/1.1\r\n\r\n")))
    pkts = [_syn(OTHER, 1024 + i) for i in range(n)]
    t0 = time.perf_counter()
    for pkt in pkts:
        _feed(e, pkt)
    return (time.perf_counter() - t0) / n * 1e6


def _reply(src_port: int, seq: int, ack: int, flags: int, payload_len: int = 0,
           options: bytes = b"") -> bytes:
    return wire.reply_header(P.build(TARGET, CLIENT, 80, src_port, seq, ack, flags, 65535,
                                     options, bytes(payload_len)))


def session_cost(n: int = 2000) -> float:
    """µs per short session, every packet the engine sees of it: the client's SYN, the
    target's SYN-ACK, a request, the target's ACK with its answer, the client's FIN, the
    target's FIN, and the timers that end it."""
    e = _engine(4096)
    synack_opts = P.syn_options(1460, 7, True, (3333, 1))
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    ports = [1024 + i for i in range(n)]
    steps = []
    for port in ports:
        steps.append((_syn(CLIENT, port), _reply(port, 5000, 1001, P.SYN | P.ACK, 0,
                                                  synack_opts),
                      bytes(P.build(CLIENT, ONLINE, port, 80, 1001, 5001, P.ACK | P.PSH, 502,
                                    b"", request)),
                      _reply(port, 5001, 1001 + len(request), P.ACK | P.PSH, 600),
                      bytes(P.build(CLIENT, ONLINE, port, 80, 1001 + len(request), 5601,
                                    P.ACK | P.FIN, 502)),
                      _reply(port, 5601, 1002 + len(request), P.ACK | P.FIN)))
    t0 = time.perf_counter()
    now = 1.0
    for syn, synack, data, answer, fin, target_fin in steps:
        _feed(e, syn, now)
        e.on_reply(synack, now)
        e.flush(now)
        _feed(e, data, now)
        e.on_reply(answer, now)
        e.flush(now)
        now += 2.0      # the target has gone quiet: the FIN goes at once
        _feed(e, fin, now)
        e.on_reply(target_fin, now)
        e.flush(now)
        e.tick(now + 0.1)
    elapsed = time.perf_counter() - t0
    assert not e.sessions, "the benchmark's sessions did not all end"
    return elapsed / n * 1e6


def in_order_cost(held: int, n: int = 2000) -> float:
    """µs per in-order data segment of a session that holds ``held`` segments beyond a
    gap (their gap never fills)."""
    e = _engine(16)
    e.max_session_buffer = 1 << 30
    _feed(e, _syn(CLIENT, 40000))
    for i in range(held):
        _feed(e, bytes(P.build(CLIENT, ONLINE, 40000, 80, 10_000_000 + 100 * i, 1, P.ACK,
                               502, b"", b"h" * 10)))
    pkts = [bytes(P.build(CLIENT, ONLINE, 40000, 80, 1001 + 10 * i, 1, P.ACK, 502, b"",
                          b"d" * 10)) for i in range(n)]
    t0 = time.perf_counter()
    for pkt in pkts:
        _feed(e, pkt)
    return (time.perf_counter() - t0) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tcpcopyd.lab.enginebench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=65536)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)      # resets of overflowing sessions are logged
    cases = [("short session, every packet both ways", session_cost),
             (f"SYN, empty table of {args.slots}", lambda: syn_cost(args.slots, "none")),
             ("SYN, full table, every session idle", lambda: syn_cost(args.slots, "idle")),
             ("SYN, full table, every session busy", lambda: syn_cost(args.slots, "busy")),
             ("in-order segment, 0 held out of order", lambda: in_order_cost(0)),
             ("in-order segment, 4 000 held out of order", lambda: in_order_cost(4000))]
    print(f"| case | µs per packet, per session for the first (median of {args.rounds}) |"
          "\n|---|---|")
    for name, run in cases:
        print(f"| {name} | {statistics.median(run() for _ in range(args.rounds)):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
