"""The cost of the engine, in microseconds of this machine's CPU: a whole short session (the
common case: every packet of it, both ways), a keep-alive connection (per request), and the
worst cases: a SYN on an empty session table against one on a full table (every session
idle, or every one with data in flight), and a segment in order while many are held out of
order. Medians of several rounds; the table's heading names the build (compiled or pure).

    python -m tcpcopyd.lab.enginebench [--slots 65536] [--rounds 5] [--wake-ups]

With ``--wake-ups``: what falling asleep and being woken costs, as the CPU time of the
process (a sleep alone; keep-alive requests with a sleep after every 1, 2, 4 or 8).
"""
from __future__ import annotations

import argparse
import logging
import socket
import statistics
import sys
import time

from tcpcopyd import native
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


def _with_live(e: Engine, live: int) -> Engine:
    """``live`` other sessions established and idle (their timers in the engine's queue),
    as on a busy host."""
    synack_opts = P.syn_options(1460, 7, True, (3333, 1))
    for i in range(live):
        src, port = bytes([198, 18, 4, i // 250]), 2000 + i % 250
        _feed(e, _syn(src, port))
        e.on_reply(wire.reply_header(P.build(TARGET, src, 80, port, 5000, 1001,
                                             P.SYN | P.ACK, 65535, synack_opts)), 1.0)
        e.flush(1.0)
    return e


def session_cost(n: int = 2000, requests: int = 1, live: int = 4000, nap: float = 0.0,
                 every: int = 1, cpu: bool = False) -> float:
    """µs per request of a connection of ``requests`` requests, every packet the engine
    sees of it: the client's SYN, the target's SYN-ACK, each request and the target's ACK
    with its answer, the client's FIN, the target's FIN, and the timers that end it; with
    ``live`` other sessions open. ``nap`` seconds of sleep after every ``every`` requests
    (as a worker sleeps between wake-ups); ``cpu``: the CPU time of this process is
    counted, not the time that passed."""
    clock = time.process_time if cpu else time.perf_counter
    e = _with_live(_engine(8192), live)
    synack_opts = P.syn_options(1460, 7, True, (3333, 1))
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    size, answer = len(request), 600
    steps = []
    for port in (1024 + i for i in range(n)):
        exchanges = [(bytes(P.build(CLIENT, ONLINE, port, 80, 1001 + k * size,
                                    5001 + k * answer, P.ACK | P.PSH, 502, b"", request)),
                      _reply(port, 5001 + k * answer, 1001 + (k + 1) * size, P.ACK | P.PSH,
                             answer))
                     for k in range(requests)]
        end = 1001 + requests * size
        steps.append((_syn(CLIENT, port), _reply(port, 5000, 1001, P.SYN | P.ACK, 0,
                                                  synack_opts), exchanges,
                      bytes(P.build(CLIENT, ONLINE, port, 80, end, 5001 + requests * answer,
                                    P.ACK | P.FIN, 502)),
                      _reply(port, 5001 + requests * answer, end + 1, P.ACK | P.FIN)))
    sleep = time.sleep
    done = 0
    t0 = clock()
    now = 1.0
    for syn, synack, exchanges, fin, target_fin in steps:
        _feed(e, syn, now)
        e.on_reply(synack, now)
        e.flush(now)
        for data, reply in exchanges:
            _feed(e, data, now)
            e.on_reply(reply, now)
            e.flush(now)
            done += 1
            if nap and done % every == 0:
                sleep(nap)
        now += 2.0      # the target has gone quiet: the FIN goes at once
        _feed(e, fin, now)
        e.on_reply(target_fin, now)
        e.flush(now)
        e.tick(now + 0.1)
    elapsed = clock() - t0
    assert len(e.sessions) <= live, "the benchmark's sessions did not all end"
    return elapsed / n / requests * 1e6


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


def nap_cost(nap: float, n: int = 5000) -> float:
    """µs of this process's CPU time per ``nap`` seconds of sleep, and nothing else: what
    falling asleep and being woken costs any process here."""
    t0 = time.process_time()
    for _ in range(n):
        time.sleep(nap)
    return (time.process_time() - t0) / n * 1e6


def wake_up_cases(nap: float = 0.0002) -> list:
    """What a wake-up costs: a sleep alone, and keep-alive requests with a sleep after
    every 1, 2, 4 and 8 of them (the CPU time of the process: run it on a CPU of its own,
    ``taskset -c 0``)."""
    us = f"{nap * 1e6:.0f} µs"
    return [(f"a {us} sleep alone, per sleep", lambda: nap_cost(nap)),
            ("keep-alive request, back to back",
             lambda: session_cost(1000, requests=10, cpu=True))] + [
        (f"keep-alive request, a {us} sleep after every {k}",
         lambda k=k: session_cost(1000, requests=10, nap=nap, every=k, cpu=True))
        for k in (1, 2, 4, 8)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tcpcopyd.lab.enginebench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=65536)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--wake-ups", action="store_true",
                    help="what a wake-up costs instead: a sleep alone, and keep-alive requests "
                         "with a sleep after every 1, 2, 4 and 8 of them (CPU time)")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)      # resets of overflowing sessions are logged
    cases = [("short session, every packet both ways, 4 000 others open", session_cost),
             ("keep-alive, per request of 10, 4 000 others open",
              lambda: session_cost(500, requests=10)),
             (f"SYN, empty table of {args.slots}", lambda: syn_cost(args.slots, "none")),
             ("SYN, full table, every session idle", lambda: syn_cost(args.slots, "idle")),
             ("SYN, full table, every session busy", lambda: syn_cost(args.slots, "busy")),
             ("in-order segment, 0 held out of order", lambda: in_order_cost(0)),
             ("in-order segment, 4 000 held out of order", lambda: in_order_cost(4000))]
    if args.wake_ups:
        cases = wake_up_cases()
    unit = "µs of CPU time each" if args.wake_ups else \
        "µs per packet; per request for the first two"
    print(f"| case ({native.build()}) | {unit} (median of {args.rounds}) |\n|---|---|")
    for name, run in cases:
        print(f"| {name} | {statistics.median(run() for _ in range(args.rounds)):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
