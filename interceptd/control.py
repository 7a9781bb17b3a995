"""interceptd's side of the control channel: the tcpcopyd connections one worker accepted
(tcpcopyd's side is ``tcpcopyd.online.control``). It reads their 14-byte messages for the router,
writes out the reply headers the router framed for them, and drops a connection that
breaks the protocol or goes away. Non-blocking, on the worker's epoll.

Who may speak (see README, "Security model"):
- a peer whose address is not in ``allow`` is refused: if it offers our extensions it is
  told why, then the connection is closed; it is logged once a minute per address;
- each worker holds at most ``max_connections`` connections, ``max_connections_per_address``
  from one address; beyond, new ones are closed at once;
- the first message must be the version message, and the handshake must be over within
  HANDSHAKE_TIMEOUT (with ``secret_file``: both sides prove the secret, no registration
  is taken before, and after it every batch both ways is tagged: ``tcpcopyd.net.auth``);
- out of file descriptors, accepting pauses for ACCEPT_PAUSE instead of spinning.
Every refusal is counted.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import select
import socket
from collections.abc import Callable

from interceptd import counters as C
from interceptd.router import WORKER_MAX_PENDING, Holder, Router
from tcpcopyd.net import auth, wire
from tcpcopyd.net.packet import endpoint

log = logging.getLogger("interceptd.control")

RECV_SIZE = 16384
# seconds a connection has to finish its handshake (version message, proof of the secret)
HANDSHAKE_TIMEOUT = 5.0
# seconds a refused peer has to send its offer (and learn why it is refused)
REFUSE_WAIT = 1.0
# seconds accepting pauses when the process is out of file descriptors
ACCEPT_PAUSE = 1.0
# a refused address is logged at most once in this many seconds
REFUSED_LOG_EVERY = 60.0
# addresses remembered for that (then the memory is cleared)
REFUSED_LOG_MAX = 10000


class Peer(Holder):
    """One tcpcopyd control connection: its socket, what it sent that is not read yet, and
    where its handshake stands (the routes it holds are the router's ``Holder`` part)."""

    __slots__ = ("sock", "name", "id", "inbuf", "since", "ready", "offered", "features",
                 "challenge", "seen", "proof", "refused", "writer", "reader", "ipv6",
                 "parts6", "watching_out")

    def __init__(self, sock: socket.socket, name: str, peer_id: int = 0,
                 address: bytes = b"\0\0\0\0", since: float = 0.0) -> None:
        super().__init__(address)
        self.sock = sock
        self.name = name
        self.id = peer_id
        self.inbuf = bytearray()
        self.since = since               # accepted at (monotonic)
        self.ready = False               # handshake over: registrations taken
        self.offered = False             # sent a HELLO: extension frames may go to it
        self.features = 0                # what its HELLO offered
        self.challenge = bytearray()     # CHALLENGE parts received so far (its nonce)
        self.seen = b""                  # the handshake both proofs are bound to
        self.proof = bytearray()         # PROOF parts received so far
        self.refused: str | None = None  # why it is refused (it is told if it offered)
        self.writer: auth.Tagger | None = None   # tags our batches to it (after the proofs)
        self.reader: auth.Tagger | None = None   # checks its batches
        self.ipv6 = False                # granted FEATURE_IPV6: may register IPv6 sessions
        self.parts6 = bytearray()        # the parts of an IPv6 registration read so far
        self.watching_out = False        # its socket's epoll interest includes EPOLLOUT


def _from(address: bytes) -> Callable[[Peer], bool]:
    """Whether a peer connected from ``address``."""
    return lambda p: p.address == address


class ControlServer:
    """The tcpcopyd connections one worker accepted: their handshake (version, the secret's proof,
    extensions), their registrations handed to the router, the reply frames written back, and the
    limits that keep a hostile peer from holding the slots."""

    def __init__(self, listener: socket.socket, epoll: select.epoll, router: Router,
                 counters: list[int], index: int, allow: tuple = (),
                 secret: bytes | None = None, max_peers: int = 256,
                 max_peers_per_address: int = 64,
                 logged: Callable[[bytes, float, float], bool] | None = None,
                 ipv6: bool = False) -> None:
        """``listener``: the control port, shared by every worker (accept never waits);
        ``allow``: the networks whose hosts may connect; ``logged(address, now,
        every)``: whether a refused address is due to be logged (shared by the workers);
        ``ipv6``: the target's IPv6 replies reach us (FEATURE_IPV6 is granted)."""
        self.listener = listener
        self.listener.setblocking(False)
        self.listen_fd = listener.fileno()
        self.epoll = epoll
        self.router = router
        self.counters = counters
        self.index = index
        self.allow = allow
        self.secret = secret
        self.max_peers = max_peers
        self.max_peers_per_address = max_peers_per_address
        self.ipv6 = ipv6
        self.peers: dict[int, Peer] = {}
        self.per_address: dict[bytes, int] = {}
        self._next_peer_id = (index << 24) + 1
        self._paused_until = 0.0
        self._logged = logged or _LocalLog().due
        epoll.register(self.listen_fd, select.EPOLLIN)

    def __len__(self) -> int:
        return len(self.peers)

    def payload_peers(self) -> int:
        """Connections that asked for the answers' first bytes (a comparison test)."""
        return sum(1 for p in self.peers.values() if p.payload)

    def on_event(self, fd: int, ev: int, now: float) -> int:
        """Handle an epoll event if ``fd`` is the control port or one of our peers; the
        bytes of control input it read (what the worker's turn counts)."""
        if fd == self.listen_fd:
            self._accept(now)
            return 0
        peer = self.peers.get(fd)
        if peer is None:
            return 0
        return self._on_peer(fd, peer, ev, now)

    def flush(self) -> None:
        """Frame what the router queued for each peer and write it out."""
        frame = self.router.frame
        room = WORKER_MAX_PENDING - sum(len(p.out) for p in self.peers.values())
        for fd, peer in list(self.peers.items()):
            if peer.pending:
                before = len(peer.out)
                frame(peer, room)
                room -= len(peer.out) - before
                if peer.writer is not None and len(peer.out) > before:
                    peer.out += wire.tag_frame(peer.writer.tag(peer.out[before:]))
            if peer.out:
                self._send(fd, peer)

    def tick(self, now: float) -> None:
        """Every round of the worker: end handshakes that took too long; accept again
        after a pause."""
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            self.epoll.modify(self.listen_fd, select.EPOLLIN)
        for fd, peer in list(self.peers.items()):
            if peer.ready:
                continue
            if peer.refused is not None and now - peer.since >= REFUSE_WAIT:
                self._drop(fd, peer, None)
            elif now - peer.since >= HANDSHAKE_TIMEOUT:
                self.counters[C.INDEX["handshake_timeouts"]] += 1
                self._drop(fd, peer, f"did not finish its handshake within "
                                     f"{HANDSHAKE_TIMEOUT:g}s")

    def close(self) -> None:
        for fd, peer in list(self.peers.items()):
            self._drop(fd, peer, None)

    # ---------------------------------------------------------------- accepting
    def _accept(self, now: float) -> None:
        while True:
            try:
                sock, addr = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause(now, e)
                elif e.errno != errno.ECONNABORTED:
                    log.warning("accept: %s", e)
                return
            ip = ipaddress.ip_address(addr[0])
            if ip.version == 6 and ip.ipv4_mapped is not None:   # an IPv4 peer of "::"
                ip = ip.ipv4_mapped
            address = ip.packed
            full = len(self.peers) >= self.max_peers \
                and not self._make_room(lambda p: True)
            if not full and self.per_address.get(address, 0) >= self.max_peers_per_address:
                full = not self._make_room(_from(address))
            if full:
                self.counters[C.INDEX["peers_over_limit"]] += 1
                _reset(sock)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = Peer(sock, endpoint(address, addr[1]), self._next_peer_id, address, now)
            self._next_peer_id += 1
            self.peers[sock.fileno()] = peer
            self.per_address[address] = self.per_address.get(address, 0) + 1
            self.epoll.register(sock.fileno(), select.EPOLLIN)
            self.counters[C.INDEX["peers_accepted"]] += 1
            if not any(ip in net for net in self.allow if net.version == ip.version):
                peer.refused = f"{ip} is not in its allow list"
                self.counters[C.INDEX["peers_refused"]] += 1
                if self._logged(address, now, REFUSED_LOG_EVERY):
                    log.warning("refused a control connection from %s: not in allow (add "
                                "the online host's address to allow in "
                                "/etc/interceptd.conf, or --allow)", ip)
                continue
            log.info("tcpcopyd %s connected to worker %d", peer.name, self.index + 1)

    def _make_room(self, among: Callable[[Peer], bool]) -> bool:
        """At a limit: end the oldest connection ``among`` those still in their handshake
        or refused (a working tcpcopyd's connections are never ended for a newcomer), so
        that silent or refused peers cannot keep a tcpcopyd that reconnects out."""
        waiting = [(p.since, fd, p) for fd, p in self.peers.items()
                   if not p.ready and among(p)]
        if not waiting:
            return False
        _, fd, peer = min(waiting, key=lambda w: (w[0], w[1]))
        self.counters[C.INDEX["peers_displaced"]] += 1
        self._drop(fd, peer, None if peer.refused else "displaced before finishing its "
                   "handshake (the connection limit was reached)")
        return True

    def _pause(self, now: float, e: OSError) -> None:
        """Out of descriptors (or memory): stop accepting for a while rather than spin on a
        connection the kernel keeps offering."""
        self.counters[C.INDEX["accept_paused"]] += 1
        self._paused_until = now + ACCEPT_PAUSE
        self.epoll.modify(self.listen_fd, 0)
        log.warning("accept: %s: accepting control connections again in %gs",
                    e.strerror, ACCEPT_PAUSE)

    # ---------------------------------------------------------------- a peer
    def _on_peer(self, fd: int, peer: Peer, ev: int, now: float) -> int:
        got = 0
        if ev & select.EPOLLIN:
            try:
                data = peer.sock.recv(RECV_SIZE)
            except BlockingIOError:
                data = None
            except OSError as e:
                self._drop(fd, peer, e.strerror)
                return 0
            if data == b"":
                self._drop(fd, peer, None if peer.refused else "closed the connection")
                return 0
            if data:
                got = len(data)
                peer.inbuf += data
                try:
                    self._read(peer, now)
                except wire.TagError as e:
                    self.counters[C.INDEX["auth_failures"]] += 1
                    self._drop(fd, peer, str(e))
                    return got
                except wire.ProtocolError as e:
                    self._drop(fd, peer, None if peer.refused else str(e))
                    return got
        elif ev & (select.EPOLLERR | select.EPOLLHUP):
            self._drop(fd, peer, "connection error")
            return 0
        if ev & select.EPOLLOUT:
            self._send(fd, peer)
        return got

    def _read(self, peer: Peer, now: float) -> None:
        """The messages of ``peer.inbuf``: one by one in the handshake (what comes after the
        proof is tagged), then all at once (with a secret, each batch once its tag checks)."""
        while not peer.ready and len(peer.inbuf) >= wire.CLIENT_MSG_SIZE:
            self._on_message(peer, wire.parse_client_messages(peer.inbuf, 1)[0], now)
        if not peer.ready:
            return
        messages = wire.parse_client_messages(peer.inbuf) if peer.reader is None \
            else wire.open_messages(peer.inbuf, peer.reader)
        for msg in messages:
            self._on_message(peer, msg, now)

    def _on_message(self, peer: Peer, msg: tuple, now: float) -> None:
        """One message: the handshake's here, registrations to the router once it is over.
        Raises ProtocolError to drop the connection."""
        kind, cip, cport, tip, tport = msg
        if not peer.versioned:
            # exactly the version message, checked here: nothing reaches the router first
            if kind != wire.VERSION or cip != b"\0\0\0\0" or cport or tip != b"\0\0\0\0" \
                    or tport:
                self.counters[C.INDEX["bad_peers"]] += 1
                raise wire.ProtocolError("did not begin with the version message (not a "
                                         "tcpcopyd?)")
            peer.versioned = True
            peer.ready = peer.refused is None and self.secret is None
            return
        if kind == wire.HELLO:
            if peer.offered:
                raise wire.ProtocolError("a second offer")
            self._on_hello(peer, int.from_bytes(cip, "big"))
        elif kind == wire.CHALLENGE and self.secret is None and peer.offered:
            pass          # our WELCOME told it we have no secret: it leaves
        elif kind in wire.HANDSHAKE_KINDS:
            if peer.ready:
                raise wire.ProtocolError("a handshake message after the handshake")
            part = wire.proof_part(cip, cport, tip, tport)
            if kind == wire.CHALLENGE:
                self._on_challenge(peer, part)
            else:
                self._on_proof(peer, part)
        elif peer.refused is not None:
            raise wire.ProtocolError("refused")
        elif not peer.ready:
            self.counters[C.INDEX["auth_failures"]] += 1
            self._refuse(peer, wire.SECRET_WANTED, "it wants the shared secret")
        else:
            self._registration(peer, msg, now)

    def _registration(self, peer: Peer, msg: tuple, now: float) -> None:
        """A message after the handshake: to the router (the parts of an IPv6 one
        gathered first)."""
        kind, cip, cport, tip, tport = msg
        if kind == wire.CLIENT_ADD6 or kind == wire.CLIENT_DEL6:
            self._on_part6(peer, kind, wire.proof_part(cip, cport, tip, tport), now)
        elif peer.parts6:
            raise wire.ProtocolError("an IPv6 registration cut short")
        else:
            self.router.on_message(peer, kind, cip, cport, now, tip, tport)

    def _on_part6(self, peer: Peer, kind: int, part: bytes, now: float) -> None:
        """One part of an IPv6 registration; the last hands the whole to the router."""
        if not peer.ipv6:
            raise wire.ProtocolError("an IPv6 registration, not granted")
        if peer.parts6 and peer.parts6[0] != kind & 0xFF:
            raise wire.ProtocolError("an IPv6 registration cut short")
        if not peer.parts6:
            peer.parts6.append(kind & 0xFF)
        peer.parts6 += part
        if len(peer.parts6) < 1 + 12 * wire.REGISTRATION6_PARTS:
            return
        cip6, cport6, tip6, tport6 = wire.registration6_fields(bytes(peer.parts6[1:]))
        peer.parts6.clear()
        self.router.on_message(peer, wire.CLIENT_ADD if kind == wire.CLIENT_ADD6
                               else wire.CLIENT_DEL, cip6, cport6, now, tip6, tport6)

    def _on_hello(self, peer: Peer, features: int) -> None:
        peer.offered = True
        peer.features = features
        if peer.refused is not None:
            self._refuse(peer, wire.NOT_ALLOWED, peer.refused)
        peer.payload = bool(features & wire.FEATURE_PAYLOAD)
        peer.ipv6 = self.ipv6 and bool(features & wire.FEATURE_IPV6)
        if self.secret is None:
            # a tcpcopyd that offers the secret learns we have none, and leaves
            peer.out += wire.welcome_frame(self._granted(peer, 0))
        elif not features & wire.FEATURE_AUTH:
            self.counters[C.INDEX["auth_failures"]] += 1
            self._refuse(peer, wire.SECRET_WANTED, "it wants the shared secret")
        # else: the answer waits for its challenge

    @staticmethod
    def _granted(peer: Peer, features: int) -> int:
        """What our WELCOME grants: ``features``, the payload if offered, IPv6 if offered
        and the target's IPv6 replies reach us."""
        return features | (peer.features & wire.FEATURE_PAYLOAD) \
            | (wire.FEATURE_IPV6 if peer.ipv6 else 0)

    def _on_challenge(self, peer: Peer, part: bytes) -> None:
        if self.secret is None or not peer.features & wire.FEATURE_AUTH:
            raise wire.ProtocolError("a challenge nobody offered")
        if peer.seen:
            raise wire.ProtocolError("a second challenge")
        peer.challenge += part
        if len(peer.challenge) < 12 * wire.CHALLENGE_PARTS:
            return
        ours = auth.nonce()
        granted = self._granted(peer, wire.FEATURE_AUTH)
        peer.seen = auth.transcript(bytes(peer.challenge[:auth.NONCE_SIZE]), ours,
                                    peer.features, granted)
        peer.out += wire.welcome_frame(granted, ours, auth.server_proof(self.secret, peer.seen))

    def _on_proof(self, peer: Peer, part: bytes) -> None:
        if not peer.seen or self.secret is None:
            raise wire.ProtocolError("a proof nobody asked for")
        peer.proof += part
        if len(peer.proof) < 12 * wire.PROOF_PARTS:
            return
        if not auth.same(auth.client_proof(self.secret, peer.seen),
                         bytes(peer.proof[:32])):
            self.counters[C.INDEX["auth_failures"]] += 1
            self._refuse(peer, wire.WRONG_PROOF, "wrong proof of the shared secret")
        peer.writer, peer.reader = auth.pair(self.secret, peer.seen, tcpcopyd=False)
        peer.ready = True
        log.info("tcpcopyd %s proved the shared secret", peer.name)

    def _refuse(self, peer: Peer, why: int, words: str) -> None:
        """Tell the peer why (if it offered our extensions), then drop it."""
        if peer.offered:
            try:
                peer.sock.send(wire.refused_frame(why, words))
            except OSError:
                pass
        raise wire.ProtocolError(f"refused: {words} ({wire.REFUSAL_FIX[why]})")

    # ---------------------------------------------------------------- output, end
    def _send(self, fd: int, peer: Peer) -> None:
        try:
            n = peer.sock.send(peer.out)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self._drop(fd, peer, e.strerror)
            return
        del peer.out[:n]
        # the interest changes only when a send leaves bytes behind or clears them: no
        # system call for the usual send that takes everything
        want_out = bool(peer.out)
        if want_out != peer.watching_out:
            peer.watching_out = want_out
            self.epoll.modify(fd, select.EPOLLIN | (select.EPOLLOUT if want_out else 0))

    def _drop(self, fd: int, peer: Peer, why: str | None) -> None:
        if why:
            log.info("tcpcopyd %s %s", peer.name, why)
        self.router.drop_peer(peer)
        self.peers.pop(fd, None)
        n = self.per_address.get(peer.address, 1) - 1
        if n:
            self.per_address[peer.address] = n
        else:
            self.per_address.pop(peer.address, None)
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        peer.sock.close()


class _LocalLog:
    """This worker's own memory of refused addresses logged (when none is shared)."""

    def __init__(self) -> None:
        self.last: dict[bytes, float] = {}

    def due(self, address: bytes, now: float, every: float) -> bool:
        last = self.last.get(address)
        if last is not None and now - last < every:
            return False
        if len(self.last) >= REFUSED_LOG_MAX:
            self.last.clear()
        self.last[address] = now
        return True


def _reset(sock: socket.socket) -> None:
    """Close at once with a reset (SO_LINGER 0): nothing of ours lingers."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    except OSError:
        pass
    sock.close()
