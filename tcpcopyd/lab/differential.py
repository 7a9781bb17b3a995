"""The same packets through two builds of the engine (compiled and pure Python) must make the
same packets: a script of real-looking sessions (handshake, requests of one or more segments,
the target's answers and now and then its duplicate ACKs, FIN or RST) from many clients at
once, with what a capture and a network do to them: client segments lost, repeated or
swapped, replies lost or repeated, time jumping ahead so that timers fire. Returns a digest
of every packet sent, in order, and the counters.

    python -m tcpcopyd.lab.differential [--sessions 400] [--seed 1]   (prints JSON)

``TCPCOPYD_PURE=1`` selects the pure build; tests/unit/test_native.py runs both and compares.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator

from tcpcopyd import native
from tcpcopyd.lab.fuzz import CLIENT, ONLINE, TARGET, CheckingSender, NoControl
from tcpcopyd.net import packet as P
from tcpcopyd.net import wire
from tcpcopyd.online import counters as C
from tcpcopyd.online.engine import Engine

MSS = 1460
TARGET_ISN = 5000


def _session(rng: random.Random, port: int) -> Iterator[tuple[str, bytes]]:
    """One connection's events in order: ("client", packet) or ("reply", header)."""
    isn = rng.randrange(1 << 32)
    opts = P.syn_options(MSS, 7, True, (1, 0)) if rng.random() < 0.8 else b""

    def client(seq: int, ack: int, flags: int, payload: bytes = b"") -> tuple[str, bytes]:
        return "client", bytes(P.build(CLIENT, ONLINE, port, 80, seq & 0xFFFFFFFF,
                                       ack & 0xFFFFFFFF, flags, 502, b"", payload))

    def reply(seq: int, ack: int, flags: int, length: int = 0) -> tuple[str, bytes]:
        return "reply", wire.reply_header(P.build(TARGET, CLIENT, 80, port, seq & 0xFFFFFFFF,
                                                  ack & 0xFFFFFFFF, flags, 65535, b"",
                                                  bytes(length)))

    if rng.random() < 0.9:       # else: opened before the capture started (a fake SYN)
        yield "client", bytes(P.build(CLIENT, ONLINE, port, 80, isn, 0, P.SYN, 64240, opts))
        yield reply(TARGET_ISN, isn + 1, P.SYN | P.ACK)
    seq, tseq = isn + 1, TARGET_ISN + 1
    for _ in range(rng.randrange(1, 11)):
        request = rng.randbytes(rng.choice((40, 300, 2000, 5000)))
        for i in range(0, len(request), MSS):
            yield client(seq + i, tseq, P.ACK | P.PSH, request[i:i + MSS])
        if rng.random() < 0.1:   # the target missed the request's start: duplicate ACKs
            for _ in range(rng.randrange(1, 5)):
                yield reply(tseq, seq, P.ACK)
        seq += len(request)
        answer = rng.choice((0, 200, 1400))
        yield reply(tseq, seq, P.ACK | P.PSH, answer)
        tseq += answer
        yield client(seq, tseq, P.ACK)
    if rng.random() < 0.15:
        yield client(seq, tseq, P.RST | P.ACK)
        return
    yield client(seq, tseq, P.FIN | P.ACK)
    yield reply(tseq, seq + 1, P.FIN | P.ACK)
    yield client(seq + 1, tseq + 1, P.ACK)


def _perturbed(rng: random.Random, events: Iterator[tuple[str, bytes]]
               ) -> Iterator[tuple[str, bytes]]:
    """Losses, repeats and swaps, as a capture and the network between them make them."""
    held: tuple[str, bytes] | None = None
    for ev in events:
        r = rng.random()
        if r < 0.03:
            continue                      # lost
        if r < 0.06:
            yield ev                      # repeated
        if held is None and ev[0] == "client" and r < 0.11:
            held = ev                     # swapped with the next event
            continue
        yield ev
        if held is not None:
            yield held
            held = None
    if held is not None:
        yield held


def run(sessions: int, seed: int) -> dict:
    rng = random.Random(seed)
    sender = CheckingSender()
    e = Engine({80: (TARGET, 80)}, sender, NoControl(), None, range(1024))
    live = [_perturbed(rng, _session(rng, 1024 + i)) for i in range(min(sessions, 64))]
    started, now, steps = len(live), 1.0, 0
    while live:
        i = rng.randrange(len(live))
        ev = next(live[i], None)
        if ev is None:
            if started < sessions:
                live[i] = _perturbed(rng, _session(rng, 1024 + started))
                started += 1
            else:
                live.pop(i)
            continue
        kind, data = ev
        if kind == "client":
            e.on_client_packet(data, len(data), now)
        else:
            e.on_reply(data, now)
        steps += 1
        if steps % 8 == 0:
            now += 0.5 if rng.random() < 0.02 else 0.001    # now and then, timers fire
            e.flush(now)
            e.tick(now)
    e.flush(now)
    for later in (1.0, 5.0, 30.0, 120.0):
        e.tick(now + later)
        e.flush(now + later)
    e.expire_idle(now + 10_000)
    return {"build": native.build(), "events": steps, "packets_sent": sender.sent,
            "sent_digest": sender.digest.hexdigest(), "sessions_left": len(e.sessions),
            "counters": {k: v for k, v in zip(C.NAMES, e.counters, strict=True) if v}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tcpcopyd.lab.differential", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    print(json.dumps(run(args.sessions, args.seed), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
