"""Routes each reply header of the target to the tcpcopyd connection that registered its
session (by the reply's destination: client ip + client port). A reply that arrives before
its CLIENT_ADD (the SYN-ACK race) waits in a short-lived delay table."""
from __future__ import annotations

import socket

from interceptd import counters as C
from tcpcopyd import wire

# how long a reply waits for its session's CLIENT_ADD, seconds
DELAY_SECONDS = 3.0
# most reply headers waiting at once
DELAY_MAX = 65536
# a peer with more unsent bytes than this stopped reading: its replies are dropped
PEER_MAX_PENDING = 16 << 20


class Peer:
    """One tcpcopyd control connection."""

    __slots__ = ("sock", "name", "inbuf", "pending", "out", "alive", "versioned", "keys")

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.inbuf = bytearray()
        self.pending: list[bytes] = []   # reply headers not yet framed
        self.out = bytearray()           # framed bytes not yet sent
        self.alive = True
        self.versioned = False
        self.keys: set[bytes] = set()    # sessions this peer registered


def route_key(ip: bytes, port: int) -> bytes:
    return ip + port.to_bytes(2, "big")


class Router:
    def __init__(self, counters: list[int]) -> None:
        self.counters = counters
        self.routes: dict[bytes, Peer] = {}
        self.delayed: dict[bytes, list[tuple[float, bytes]]] = {}
        self.n_delayed = 0

    # --------------------------------------------------------------- control messages
    def on_message(self, peer: Peer, kind: int, client_ip: bytes, client_port: int,
                   now: float) -> None:
        cnt = self.counters
        if kind == wire.CLIENT_ADD:
            cnt[C.INDEX["client_add"]] += 1
            key = route_key(client_ip, client_port)
            self.routes[key] = peer
            peer.keys.add(key)
            held = self.delayed.pop(key, None)
            if held:
                self.n_delayed -= len(held)
                peer.pending.extend(h for _, h in held)
        elif kind == wire.CLIENT_DEL:
            cnt[C.INDEX["client_del"]] += 1
            key = route_key(client_ip, client_port)
            if self.routes.get(key) is peer:
                del self.routes[key]
            peer.keys.discard(key)
        elif kind == wire.VERSION and client_ip == b"\0\0\0\0" and client_port == 0:
            peer.versioned = True
        else:
            cnt[C.INDEX["bad_messages"]] += 1

    def drop_peer(self, peer: Peer) -> None:
        peer.alive = False
        for key in peer.keys:
            if self.routes.get(key) is peer:
                del self.routes[key]
        peer.keys.clear()

    # --------------------------------------------------------------- replies
    def route(self, header: bytes, now: float) -> None:
        """Route one 64-byte reply header (its IP/TCP header starts at 0, IHL 5)."""
        key = header[16:20] + header[22:24]   # destination ip + destination port
        peer = self.routes.get(key)
        if peer is not None:
            peer.pending.append(header)
            return
        if self.n_delayed >= DELAY_MAX:
            self.counters[C.INDEX["delay_full"]] += 1
            return
        self.counters[C.INDEX["delayed"]] += 1
        self.delayed.setdefault(key, []).append((now, header))
        self.n_delayed += 1

    def expire(self, now: float) -> None:
        limit = now - DELAY_SECONDS
        for key in [k for k, v in self.delayed.items() if v[-1][0] < limit]:
            n = len(self.delayed.pop(key))
            self.n_delayed -= n
            self.counters[C.INDEX["delay_expired"]] += n

    def frame(self, peer: Peer) -> None:
        """Move a peer's pending headers into its output buffer as combined frames."""
        if not peer.pending:
            return
        if len(peer.out) > PEER_MAX_PENDING:
            self.counters[C.INDEX["slow_peer_dropped"]] += len(peer.pending)
        else:
            self.counters[C.INDEX["routed"]] += len(peer.pending)
            peer.out += wire.combine(peer.pending)
        peer.pending.clear()
