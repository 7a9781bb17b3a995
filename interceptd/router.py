"""Routes each reply header of the target to the tcpcopyd connection that registered its
session (by the reply's destination: client ip + client port).

Connections are held by the worker that accepted them, while the kernel hands a reply to
whichever worker reads its queue. So every worker publishes the sessions registered on its
connections in a shared-memory key table, and a reply caught by another worker is handed
to the owner through a shared-memory ring. A reply whose session nobody registered yet
(the SYN-ACK race) waits in a short-lived delay table and is looked up again.
"""
from __future__ import annotations

import socket

from interceptd import counters as C
from shm.keytable import KeyTable, OwnedRegion
from tcpcopyd import wire

# how long a reply waits for its session's CLIENT_ADD, seconds
DELAY_SECONDS = 3.0
# most reply headers waiting at once
DELAY_MAX = 65536
# a peer with more unsent bytes than this stopped reading: its replies are dropped
PEER_MAX_PENDING = 16 << 20


class Peer:
    """One tcpcopyd control connection."""

    __slots__ = ("sock", "name", "id", "inbuf", "pending", "out", "alive", "versioned", "keys")

    def __init__(self, sock: socket.socket, name: str, peer_id: int = 0) -> None:
        self.sock = sock
        self.name = name
        self.id = peer_id
        self.inbuf = bytearray()
        self.pending: list[bytes] = []   # reply headers not yet framed
        self.out = bytearray()           # framed bytes not yet sent
        self.alive = True
        self.versioned = False
        self.keys: set[bytes] = set()    # sessions this peer registered


def route_key(ip: bytes, port: int) -> bytes:
    return ip + port.to_bytes(2, "big")


class Router:
    def __init__(self, counters: list[int], index: int = 0, table: KeyTable | None = None
                 ) -> None:
        self.counters = counters
        self.index = index
        self.routes: dict[bytes, Peer] = {}
        self.delayed: dict[bytes, list[tuple[float, bytes]]] = {}
        self.n_delayed = 0
        self.table = table if table is not None and table.regions > 1 else None
        self.shared = OwnedRegion(table, index) if self.table is not None else None
        self.outbox: dict[int, list[bytes]] = {}   # worker index -> headers to hand over

    # --------------------------------------------------------------- control messages
    def on_message(self, peer: Peer, kind: int, client_ip: bytes, client_port: int,
                   now: float) -> None:
        cnt = self.counters
        if kind == wire.CLIENT_ADD:
            cnt[C.INDEX["client_add"]] += 1
            key = route_key(client_ip, client_port)
            self.routes[key] = peer
            peer.keys.add(key)
            if self.shared is not None and not self.shared.put(key, peer.id):
                cnt[C.INDEX["route_table_full"]] += 1
            held = self.delayed.pop(key, None)
            if held:
                self.n_delayed -= len(held)
                peer.pending.extend(h for _, h in held)
        elif kind == wire.CLIENT_DEL:
            cnt[C.INDEX["client_del"]] += 1
            key = route_key(client_ip, client_port)
            if self.routes.get(key) is peer:
                del self.routes[key]
                if self.shared is not None:
                    self.shared.remove(key)
            peer.keys.discard(key)
        elif kind == wire.VERSION and client_ip == b"\0\0\0\0" and client_port == 0:
            peer.versioned = True
        elif client_ip == b"\0\0\0\0" and client_port == 0 and not peer.versioned:
            # a version message of another protocol version (its type is the version)
            cnt[C.INDEX["bad_messages"]] += 1
            raise wire.ProtocolError(f"speaks protocol version {kind}, this interceptd "
                                     f"speaks {wire.VERSION}: install the same release on "
                                     "both hosts")
        else:
            cnt[C.INDEX["bad_messages"]] += 1

    def drop_peer(self, peer: Peer) -> None:
        peer.alive = False
        for key in peer.keys:
            if self.routes.get(key) is peer:
                del self.routes[key]
                if self.shared is not None:
                    self.shared.remove(key)
        peer.keys.clear()

    # --------------------------------------------------------------- replies
    def route(self, header: bytes, now: float) -> None:
        """Route one 64-byte reply header caught by this worker."""
        key = header[16:20] + header[22:24]   # destination ip + destination port
        peer = self.routes.get(key)
        if peer is not None:
            peer.pending.append(header)
            return
        if self.table is not None:
            found = self.table.find(key, skip=self.index)
            if found is not None:
                self.outbox.setdefault(found[0], []).append(header)
                return
        self._delay(key, header, now)

    def deliver(self, header: bytes, now: float) -> None:
        """A reply header handed over by another worker: ours, or it waits."""
        key = header[16:20] + header[22:24]
        peer = self.routes.get(key)
        if peer is not None:
            peer.pending.append(header)
        else:
            self._delay(key, header, now)

    def _delay(self, key: bytes, header: bytes, now: float) -> None:
        if self.n_delayed >= DELAY_MAX:
            self.counters[C.INDEX["delay_full"]] += 1
            return
        self.counters[C.INDEX["delayed"]] += 1
        self.delayed.setdefault(key, []).append((now, header))
        self.n_delayed += 1

    def retry_delayed(self, now: float) -> None:
        """Hand waiting replies to the worker that registered their session since, and drop
        those that waited too long."""
        limit = now - DELAY_SECONDS
        for key in list(self.delayed):
            held = self.delayed[key]
            target = None
            if self.table is not None:
                found = self.table.find(key, skip=self.index)
                target = None if found is None else found[0]
            if target is not None:
                self.outbox.setdefault(target, []).extend(h for _, h in held)
            elif held[-1][0] >= limit:
                continue
            else:
                self.counters[C.INDEX["delay_expired"]] += len(held)
            del self.delayed[key]
            self.n_delayed -= len(held)

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
