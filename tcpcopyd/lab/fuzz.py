"""Fuzzing the parts that read the network: random and mutated packets through tcpcopyd's
session engine (captured client packets and the target's reply headers), random and
mutated control frames through tcpcopyd's reading of interceptd's frames and through
interceptd's control server and router (over loopback sockets). Nothing may raise; what
is wrong is counted. Prints the counters and the rates.

    python -m tcpcopyd.lab.fuzz --packets 1000000 --frames 100000 [--seed N]
"""
from __future__ import annotations

import argparse
import hashlib
import ipaddress
import random
import select
import socket
import sys
import time
from collections.abc import Iterator

from interceptd import counters as IC
from interceptd.control import ControlServer, Peer
from interceptd.replies import Recorder
from interceptd.router import Router
from interceptd.worker import from_ring_records, ring_records
from tcpcopyd.net import auth, wire
from tcpcopyd.net import packet as P
from tcpcopyd.online import counters as C
from tcpcopyd.online.engine import Engine

CLIENT = socket.inet_aton("198.18.1.1")
ONLINE = socket.inet_aton("198.18.1.2")
TARGET = socket.inet_aton("198.18.2.2")


class CheckingSender:
    """Stands in for the raw socket: every packet the engine sends must parse. Keeps a
    digest of all it was given, in order (the builds' differential test compares them)."""

    def __init__(self) -> None:
        self.sent = 0
        self.digest = hashlib.sha256()

    def send(self, pkt: bytearray, dst: bytes) -> bool:
        P.parse(bytes(pkt))
        self.sent += 1
        self.digest.update(dst + len(pkt).to_bytes(2, "big") + pkt)
        return True


class NoControl:
    up = True

    def register(self, s: object) -> None: ...

    def unregister(self, s: object) -> None: ...

    def flush(self, now: float) -> None: ...

    def carries(self, s: object) -> bool:
        return True


def _valid_packets(rng: random.Random) -> Iterator[bytes]:
    """Plausible client segments of a few sessions: SYN, data, FIN, RST."""
    while True:
        port = 40000 + rng.randrange(64)
        seq = rng.randrange(1 << 32)
        flags = rng.choice((P.SYN, P.ACK | P.PSH, P.ACK, P.ACK | P.FIN, P.RST, P.ACK | P.PSH))
        payload = rng.randbytes(rng.choice((0, 1, 10, 100, 1460)))
        options = rng.choice((b"", P.syn_options(1460, 7, True, (1, 0)),
                              P.timestamp_option(5, 6)))
        yield bytes(P.build(CLIENT, ONLINE, port, 80, seq, rng.randrange(1 << 32), flags,
                            rng.randrange(65536), options, payload))


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A random mutation: flipped bits, random bytes, cut or lengthened."""
    b = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        how = rng.randrange(4)
        if how == 0 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif how == 1 and b:
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256)
        elif how == 2:
            del b[rng.randrange(len(b) + 1):]
        else:
            b += rng.randbytes(rng.randrange(1, 64))
    return bytes(b)


def fuzz_engine(packets: int, seed: int) -> dict:
    """``packets`` inputs, a third each: random bytes, mutated client segments, mutated
    reply headers. Returns the engine's counters and the figures."""
    rng = random.Random(seed)
    sender = CheckingSender()
    e = Engine({80: (TARGET, 80)}, sender, NoControl(), None, range(4096))
    valid = _valid_packets(rng)
    now, replies = 1.0, 0
    t0 = time.perf_counter()
    for i in range(packets):
        kind = i % 3
        if kind == 0:
            pkt = rng.randbytes(rng.randrange(120))
            e.on_client_packet(pkt, len(pkt), now)
        elif kind == 1:
            pkt = mutate(rng, next(valid))
            e.on_client_packet(pkt, len(pkt), now)
        else:
            port = 40000 + rng.randrange(64)
            header = wire.reply_header(P.build(TARGET, CLIENT, 80, port, rng.randrange(1 << 32),
                                               rng.randrange(1 << 32), rng.randrange(64),
                                               rng.randrange(65536), b"", b""))
            e.on_reply(mutate(rng, header)[:64].ljust(64, b"\0"), now)
            replies += 1
        if i % 64 == 63:
            now += 0.01
            e.flush(now)
            e.tick(now)
        if i % 100_000 == 99_999:
            e.expire_idle(now + 10_000)
    e.flush(now)
    e.expire_idle(now + 10_000)
    seconds = time.perf_counter() - t0
    counters = dict(zip(C.NAMES, e.counters, strict=True))
    return {"inputs": packets, "client_packets": packets - replies, "replies": replies,
            "seconds": round(seconds, 2), "per_second": round(packets / seconds),
            "packets_sent": sender.sent, "sent_digest": sender.digest.hexdigest(),
            "sessions_left": len(e.sessions),
            "buffered_left": e.buffered_total, "out_of_order_left": e.ooo_bytes,
            "counters": counters}


def _target_packets(rng: random.Random) -> Iterator[bytes]:
    """Packets the target sends, as NFQUEUE or the assistant's capture hands them up: with
    and without IP options, with and without payload."""
    while True:
        port = 40000 + rng.randrange(64)
        pkt = bytearray(P.build(TARGET, CLIENT, 80, port, rng.randrange(1 << 32),
                                rng.randrange(1 << 32), rng.randrange(64), rng.randrange(65536),
                                rng.choice((b"", P.timestamp_option(5, 6))),
                                rng.randbytes(rng.choice((0, 1, 300, 1460)))))
        if rng.random() < 0.3:   # IP options: the header grows, the total length with it
            opts = bytes(rng.randrange(1, 11) * 4)
            pkt[20:20] = opts
            pkt[0] = 0x40 | (5 + len(opts) // 4)
            pkt[2:4] = (len(pkt)).to_bytes(2, "big")
        yield bytes(pkt)


def fuzz_replies(packets: int, seed: int) -> dict:
    """``packets`` packets of the target through interceptd's reply path (the record made
    of each, with and without the comparison test's payload prefix, then the router with
    a registered peer, and the hand-off ring's records both ways): random bytes, mutated
    packets, and headers whose lengths disagree. Only ProtocolError may come out (the
    worker counts it as malformed)."""
    rng = random.Random(seed)
    cnt = [0] * len(IC.NAMES)
    router, recorder = Router(cnt), Recorder()
    sock = socket.socket()
    peer = Peer(sock, "fuzz", 1, b"\x7f\0\0\1")
    peer.ready = peer.versioned = True
    for port in range(40000, 40064):
        router.on_message(peer, wire.CLIENT_ADD, CLIENT, port, 0.0, TARGET, 80)
    valid = _target_packets(rng)
    malformed = routed = broken = 0
    t0 = time.perf_counter()
    try:
        for i in range(packets):
            kind = i % 4
            if kind == 0:
                pkt = rng.randbytes(rng.randrange(200))
            elif kind == 3:   # the lengths lie: total length, IHL, data offset
                b = bytearray(next(valid))
                field = rng.randrange(3)
                if field == 0:
                    b[2:4] = rng.randrange(65536).to_bytes(2, "big")
                elif field == 1:
                    b[0] = 0x40 | rng.randrange(16)
                else:
                    ihl = (b[0] & 15) * 4
                    if len(b) > ihl + 12:
                        b[ihl + 12] = rng.randrange(256)
                pkt = bytes(b)
            else:
                pkt = mutate(rng, next(valid))
            recorder.want_prefix = bool(i & 8)
            try:
                record = recorder.record(memoryview(pkt))
            except wire.ProtocolError:
                malformed += 1
                continue
            router.route(record, 1.0)
            routed += 1
            groups = ring_records(record)
            if rng.random() < 0.1:   # a damaged ring: cut, or garbage
                groups = mutate(rng, b"".join(groups))
                groups = [groups[j:j + 64] for j in range(0, len(groups), 64)]
            back, bad = from_ring_records(groups)
            broken += bad
            for rec in back:
                router.deliver(rec, 1.0)
            if i % 256 == 255:
                router.frame(peer)
                peer.out.clear()
                router.retry_delayed(10.0)
    finally:
        sock.close()
    seconds = time.perf_counter() - t0
    return {"inputs": packets, "malformed": malformed, "routed": routed,
            "ring_groups_broken": broken, "seconds": round(seconds, 2),
            "per_second": round(packets / seconds),
            "router": {k: v for k, v in zip(IC.NAMES, cnt, strict=True) if v}}


def _control_messages(rng: random.Random) -> bytes:
    """A control connection's bytes: the version message (mostly), then messages real,
    random or mutated."""
    out = bytearray(wire.version_message() if rng.random() < 0.9 else rng.randbytes(14))
    for _ in range(rng.randrange(1, 40)):
        msg = wire.client_message(rng.choice((wire.CLIENT_ADD, wire.CLIENT_DEL, wire.HELLO,
                                              wire.PROOF, wire.VERSION, rng.randrange(65536))),
                                  rng.randbytes(4), rng.randrange(65536), TARGET, 80)
        out += mutate(rng, msg) if rng.random() < 0.3 else msg
    return bytes(out)


def fuzz_control(frames: int, seed: int) -> dict:
    """``frames`` inputs, half to each side: combined frames (random and mutated) as
    tcpcopyd reads them, and control connections' bytes as interceptd serves them."""
    rng = random.Random(seed)
    # tcpcopyd's side: what it does with the bytes of a link (a broken stream: reconnect)
    e = Engine({80: (TARGET, 80)}, CheckingSender(), NoControl(), None, range(64))
    link_errors = headers = 0
    for _ in range(frames // 2):
        heads = [wire.reply_header(P.build(TARGET, CLIENT, 80, 40000 + rng.randrange(8),
                                           rng.randrange(1 << 32), rng.randrange(1 << 32),
                                           rng.randrange(64), 1000, b"", b""))
                 for _ in range(rng.randrange(1, 20))]
        if rng.random() < 0.3:   # payload frames and an extension record among them
            heads = [h + rng.randbytes(rng.randrange(wire.PREFIX_MAX + 1)) for h in heads]
            frame = wire.ext_frame(wire.EXT_WELCOME, rng.randrange(4), rng.randbytes(32)) \
                + wire.combine(heads, payload=True)
        else:
            frame = wire.combine(heads)
        data = mutate(rng, frame) if rng.random() < 0.7 else rng.randbytes(rng.randrange(200))
        buf, extensions = bytearray(data), []
        try:
            got = wire.split_combined(buf, extensions)
        except wire.ProtocolError:
            link_errors += 1
            continue
        headers += len(got)
        for h in got:
            e.on_reply(h, 1.0)
    # interceptd's side: real connections to a control server on loopback
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    ep = select.epoll()
    cnt = [0] * len(IC.NAMES)
    server = ControlServer(listener, ep, Router(cnt), cnt, 0,
                           allow=(ipaddress.IPv4Network("127.0.0.0/8"),),
                           max_peers=1024, max_peers_per_address=1024)
    sent_msgs = 0
    t0 = time.perf_counter()
    try:
        remaining = frames - frames // 2
        while remaining > 0:
            clients = []
            for _ in range(min(50, remaining)):
                c = socket.create_connection(listener.getsockname())
                data = _control_messages(rng)
                sent_msgs += len(data) // 14
                c.sendall(data)
                clients.append(c)
            remaining -= len(clients)
            _serve(server, ep)
            for c in clients:
                c.close()
            _serve(server, ep)
        server.tick(time.monotonic() + 60)
    finally:
        server.close()
        listener.close()
        ep.close()
    return {"frames": frames, "link_errors": link_errors, "reply_headers": headers,
            "engine_replies_malformed": e.counters[C.REPLIES_MALFORMED],
            "control_connections": frames - frames // 2, "control_messages": sent_msgs,
            "seconds": round(time.perf_counter() - t0, 2),
            "interceptd": {k: v for k, v in zip(IC.NAMES, cnt, strict=True) if v}}


def _tagged_batches(rng: random.Random, writer: auth.Tagger, up: bool
                    ) -> list[tuple[bytes, list]]:
    """A few batches as the writer of one direction sends them: (bytes with the tag, what
    the reader must take of them)."""
    out = []
    for _ in range(rng.randrange(1, 6)):
        if up:
            data = b"".join(wire.client_message(wire.CLIENT_ADD, rng.randbytes(4),
                                                rng.randrange(65536), TARGET, 80)
                            for _ in range(rng.randrange(1, 10)))
            out.append((data + wire.tag_message(writer.tag(data)),
                        wire.parse_client_messages(bytearray(data))))
        else:
            heads = [rng.randbytes(wire.REPLY_SIZE) for _ in range(rng.randrange(1, 40))]
            data = wire.combine(heads)
            out.append((data + wire.tag_frame(writer.tag(data)), heads))
    return out


def fuzz_tags(inputs: int, seed: int) -> dict:
    """``inputs`` authenticated streams, half each way, attacked (mutated, a batch dropped,
    replayed, or the batches reordered) and read in random pieces. What the reader takes
    must be what the writer tagged, in order (a prefix of it): ``forged`` counts the
    streams where it took anything else, and must stay 0."""
    rng = random.Random(seed)
    secret = rng.randbytes(32)
    forged = refused = taken = 0
    t0 = time.perf_counter()
    for i in range(inputs):
        seen, up = rng.randbytes(72), i % 2 == 0
        writer, reader = auth.Tagger(secret, seen, up), auth.Tagger(secret, seen, up)
        batches = _tagged_batches(rng, writer, up)
        expected = [x for _, items in batches for x in items]
        parts = [b for b, _ in batches]
        how = rng.randrange(4)
        if how == 0:
            parts = [mutate(rng, b"".join(parts))]
        elif how == 1:
            del parts[rng.randrange(len(parts))]
        elif how == 2:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(parts))
        else:
            rng.shuffle(parts)
        stream, buf, got = b"".join(parts), bytearray(), []
        try:
            for pos in range(0, len(stream), 97):
                buf += stream[pos:pos + 97]
                got += wire.open_messages(buf, reader) if up \
                    else wire.split_combined(buf, [], reader)
        except wire.ProtocolError:
            refused += 1
        taken += len(got)
        forged += got != expected[:len(got)]
    return {"inputs": inputs, "refused": refused, "forged": forged, "items_taken": taken,
            "seconds": round(time.perf_counter() - t0, 2)}


def _serve(server: ControlServer, ep: select.epoll) -> None:
    """Handle events until none come for a little while."""
    quiet = 0
    while quiet < 3:
        events = ep.poll(0.002)
        quiet = 0 if events else quiet + 1
        for fd, ev in events:
            server.on_event(fd, ev, time.monotonic())
        server.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tcpcopyd.lab.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    replies = fuzz_replies(args.packets, args.seed)
    routed = replies.pop("router")
    print("replies: " + ", ".join(f"{k} {v}" for k, v in replies.items()))
    print("  router counters: " + ", ".join(f"{k} {v}" for k, v in routed.items()))
    engine = fuzz_engine(args.packets, args.seed)
    counters = engine.pop("counters")
    print("engine: " + ", ".join(f"{k} {v}" for k, v in engine.items()))
    print("  counters: " + ", ".join(f"{k} {v}" for k, v in counters.items() if v))
    control = fuzz_control(args.frames, args.seed)
    inter = control.pop("interceptd")
    print("control: " + ", ".join(f"{k} {v}" for k, v in control.items()))
    print("  interceptd counters: " + ", ".join(f"{k} {v}" for k, v in inter.items()))
    tags = fuzz_tags(args.frames, args.seed)
    print("tags: " + ", ".join(f"{k} {v}" for k, v in tags.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
