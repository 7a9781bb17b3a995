"""Routes each reply header of the target to the tcpcopyd connection that registered its
session (by the reply's destination: client ip + client port).

Connections are held by the worker that accepted them, while the kernel hands a reply to
whichever worker reads its queue. So every worker publishes the sessions registered on its
connections in a shared-memory key table, and a reply caught by another worker is handed
to the owner through a shared-memory ring. A reply whose session nobody registered yet
(the SYN-ACK race) waits in a short-lived delay table and is looked up again.

Registrations are checked: a session another peer address holds is refused (the
connections of one tcpcopyd, which share its address, may move it among themselves or
end it from any of them, as the C tcpcopy does), and so is one beyond the routes a worker
holds in all; an address beyond its own share loses its oldest route (a C tcpcopy may end
a session on another connection than it began it, so stale routes of its own age out this
way). A reply whose source is not the target its session was registered for (a forgery,
in assistant mode) is dropped. Every refusal is counted.
"""
from __future__ import annotations

import heapq
import itertools

from interceptd import counters as C
from shm.keytable import KeyTable, OwnedRegion
from tcpcopyd.net import wire
from tcpcopyd.net.packet import destination, source

# how long a reply waits for its session's CLIENT_ADD, seconds
DELAY_SECONDS = 3.0
# a reply waiting for a session that another worker may register any moment (the reply
# was caught before that worker read the CLIENT_ADD) is looked up again this long after
# it arrived, seconds, then at each round (every 0.1 s); a few look-ups a reply at most
RETRY_SOON = (0.001, 0.003, 0.01, 0.03)
# sessions waiting for those look-ups at most (the race lasts a few ms; beyond this many,
# a waiting reply is looked up at the rounds only)
SOON_MAX = 8192
# most reply headers waiting at once
DELAY_MAX = 65536
# sessions of the delay table looked up again per round (every 0.1 s): the work of a
# round is bounded however full the table is
DELAY_RETRY_BUDGET = 2048
# a peer with more unsent bytes than this stopped reading: its replies are dropped
PEER_MAX_PENDING = 4 << 20
# unsent bytes over all the peers of a worker, at most (beyond: replies dropped, counted):
# 256 connections x 4 MiB would be 1 GiB, the unit's whole MemoryMax
WORKER_MAX_PENDING = 32 << 20
# the target of a session registered with zeros (not given): replies from anywhere
ANY_TARGET = bytes(6)
ANY_TARGET6 = bytes(18)


class Holder:
    """What the router knows of a control connection that holds routes: the address that
    owns them, whether it spoke the version message, and the reply headers on their way to
    it (the control server's ``Peer`` adds the connection and its handshake)."""

    __slots__ = ("address", "alive", "versioned", "pending", "out", "payload")

    def __init__(self, address: bytes) -> None:
        self.address = address           # the peer's address (owner of its routes)
        self.alive = True
        self.versioned = False
        self.pending: list[bytes] = []   # reply headers not yet framed
        self.out = bytearray()           # framed bytes not yet sent
        self.payload = False             # it asked for answers' first bytes (FEATURE_PAYLOAD)


def route_key(ip: bytes, port: int) -> bytes:
    return ip + port.to_bytes(2, "big")


def owner_id(peer: Holder) -> int:
    """What the shared route table records of a route's holder: its peer address (an
    IPv6 one by its hash, keyed with the master's secret like the table's: nobody can
    pick an address whose id is another's)."""
    if len(peer.address) == 4:
        return int.from_bytes(peer.address, "big")
    return hash(peer.address) & 0xFFFFFFFF


class Router:
    """One worker's routes (client address and port -> the connection that registered the session)
    and the replies on their way along them: sent, handed to the worker that holds the route, or
    held until the session is registered."""

    def __init__(self, counters: list[int], index: int = 0, table: KeyTable | None = None,
                 max_routes: int = 131072, max_routes_per_address: int = 65536) -> None:
        self.counters = counters
        self.index = index
        self.max_routes = max_routes
        self.max_routes_per_address = max_routes_per_address
        # client address + port -> (peer, target address + port registered with it)
        self.routes: dict[bytes, tuple[Holder, bytes]] = {}
        # peer address -> its routes, oldest registration first
        self.by_address: dict[bytes, dict[bytes, None]] = {}
        self._targets: dict[bytes, bytes] = {}   # one bytes object per target (memory)
        self.delayed: dict[bytes, list[tuple[float, bytes]]] = {}
        self.n_delayed = 0
        # the next look-ups of waiting sessions (RETRY_SOON): (when, which, key), a heap
        # of at most SOON_MAX
        self.soon: list[tuple[float, int, bytes]] = []
        self.table = table if table is not None and table.regions > 1 else None
        self.shared = OwnedRegion(self.table, index) if self.table is not None else None
        self.outbox: dict[int, list[bytes]] = {}   # worker index -> headers to hand over

    # --------------------------------------------------------------- control messages
    def on_message(self, peer: Holder, kind: int, client_ip: bytes, client_port: int,
                   now: float, target_ip: bytes = b"\0\0\0\0", target_port: int = 0) -> None:
        cnt = self.counters
        if kind == wire.CLIENT_ADD:
            cnt[C.INDEX["client_add"]] += 1
            key = route_key(client_ip, client_port)
            if not self._may_register(peer, key):
                return
            target = target_ip + target_port.to_bytes(2, "big")
            target = self._targets.setdefault(target, target)
            if len(self._targets) > 4096:
                self._targets.clear()
            self._add_route(peer, key, target)
            held = self.delayed.pop(key, None)
            if held:
                self.n_delayed -= len(held)
                for _, h in held:
                    self._to_peer(peer, target, h)
        elif kind == wire.CLIENT_DEL:
            cnt[C.INDEX["client_del"]] += 1
            key = route_key(client_ip, client_port)
            entry = self.routes.get(key)
            if entry is not None and entry[0].address == peer.address:
                self._remove_route(key)
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

    def _may_register(self, peer: Holder, key: bytes) -> bool:
        """A registration is refused when another peer address holds the session (here or
        at another worker), or when the worker holds all the routes it may; counted."""
        entry = self.routes.get(key)
        other = entry is not None and entry[0].address != peer.address
        if entry is None and self.table is not None:
            found = self.table.find(key, skip=self.index)
            other = found is not None and found[1] != owner_id(peer)
        if other:
            self.counters[C.INDEX["routes_refused"]] += 1
            return False
        if entry is None and len(self.routes) >= self.max_routes:
            self.counters[C.INDEX["routes_over_limit"]] += 1
            return False
        return True

    def _add_route(self, peer: Holder, key: bytes, target: bytes) -> None:
        mine = self.by_address.get(peer.address)
        if mine is not None:
            if key in mine:
                self._remove_route(key)      # registered again: to the back, maybe moved
            elif len(mine) >= self.max_routes_per_address:
                self._remove_route(next(iter(mine)))
                self.counters[C.INDEX["routes_over_limit"]] += 1
        self.routes[key] = (peer, target)
        self.by_address.setdefault(peer.address, {})[key] = None
        if self.shared is not None and not self.shared.put(key, owner_id(peer)):
            self.counters[C.INDEX["route_table_full"]] += 1

    def _remove_route(self, key: bytes) -> None:
        peer, _ = self.routes.pop(key)
        mine = self.by_address[peer.address]
        del mine[key]
        if not mine:
            del self.by_address[peer.address]
        if self.shared is not None:
            self.shared.remove(key)

    def routes_of(self, peer: Holder) -> list[bytes]:
        """The sessions ``peer`` holds."""
        routes = self.routes
        return [k for k in self.by_address.get(peer.address, ()) if routes[k][0] is peer]

    def drop_peer(self, peer: Holder) -> None:
        peer.alive = False
        for key in self.routes_of(peer):
            self._remove_route(key)

    # --------------------------------------------------------------- replies
    def route(self, header: bytes, now: float) -> None:
        """Route one 64-byte reply header caught by this worker."""
        key = destination(header)   # the client: destination ip + port
        entry = self.routes.get(key)
        if entry is not None:
            self._to_peer(entry[0], entry[1], header)
            return
        if self.table is not None:
            found = self.table.find(key, skip=self.index)
            if found is not None:
                self.outbox.setdefault(found[0], []).append(header)
                return
        self._delay(key, header, now)

    def deliver(self, header: bytes, now: float) -> None:
        """A reply header handed over by another worker: ours, or it waits."""
        key = destination(header)
        entry = self.routes.get(key)
        if entry is not None:
            self._to_peer(entry[0], entry[1], header)
        else:
            self._delay(key, header, now)

    def _to_peer(self, peer: Holder, target: bytes, header: bytes) -> None:
        """Queue a reply for its peer if it comes from the target its session was
        registered for (source address + port)."""
        if target != source(header) and target != ANY_TARGET and target != ANY_TARGET6:
            self.counters[C.INDEX["replies_foreign"]] += 1
            return
        peer.pending.append(header)

    def _delay(self, key: bytes, header: bytes, now: float) -> None:
        if self.n_delayed >= DELAY_MAX:
            self.counters[C.INDEX["delay_full"]] += 1
            return
        self.counters[C.INDEX["delayed"]] += 1
        held = self.delayed.get(key)
        if held is None:
            self.delayed[key] = [(now, header)]
            if self.table is not None and len(self.soon) < SOON_MAX:
                heapq.heappush(self.soon, (now + RETRY_SOON[0], 0, key))
        else:
            held.append((now, header))
        self.n_delayed += 1

    def retry_soon(self, now: float) -> float:
        """Look up again the waiting sessions whose RETRY_SOON is due (registered by
        another worker since: their replies go to it); when the next is due (0: none)."""
        soon, delayed = self.soon, self.delayed
        while soon and soon[0][0] <= now:
            _, step, key = heapq.heappop(soon)
            held = delayed.get(key)
            if held is None:
                continue                      # delivered, expired or dropped since
            found = self.table.find(key, skip=self.index) if self.table is not None else None
            if found is not None:
                del delayed[key]
                self.n_delayed -= len(held)
                self.outbox.setdefault(found[0], []).extend(h for _, h in held)
            elif step + 1 < len(RETRY_SOON):
                heapq.heappush(soon, (held[0][0] + RETRY_SOON[step + 1], step + 1, key))
        return soon[0][0] if soon else 0.0

    def retry_delayed(self, now: float) -> None:
        """Hand waiting replies to the worker that registered their session since, and drop
        those that waited too long. At most DELAY_RETRY_BUDGET sessions a round: those
        still waiting go to the back, so every one is looked at in turn."""
        limit = now - DELAY_SECONDS
        delayed = self.delayed
        for key in list(itertools.islice(delayed, DELAY_RETRY_BUDGET)):
            held = delayed.pop(key)
            worker = None
            if self.table is not None:
                found = self.table.find(key, skip=self.index)
                worker = None if found is None else found[0]
            if worker is not None:
                self.outbox.setdefault(worker, []).extend(h for _, h in held)
            elif held[-1][0] >= limit:
                delayed[key] = held           # to the back of the line
                continue
            else:
                self.counters[C.INDEX["delay_expired"]] += len(held)
            self.n_delayed -= len(held)

    def frame(self, peer: Holder, room: int = WORKER_MAX_PENDING) -> None:
        """Move a peer's pending headers into its output buffer as combined frames;
        ``room``: what the worker's peers may still hold unsent, in all."""
        if not peer.pending:
            return
        if len(peer.out) > PEER_MAX_PENDING or room <= 0:
            self.counters[C.INDEX["slow_peer_dropped"]] += len(peer.pending)
        else:
            self.counters[C.INDEX["routed"]] += len(peer.pending)
            peer.out += wire.combine(peer.pending, peer.payload)
        peer.pending.clear()
