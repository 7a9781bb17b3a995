"""tcpcopyd's control connection to one interceptd: registers sessions (CLIENT_ADD/DEL) and
receives the target's reply headers. Non-blocking; reconnects with backoff, forever.

After the version message it offers our extensions (``wire.HELLO``). Without a shared
secret the link is up at once (a C intercept just ignores the offer). With one, the link
comes up only once interceptd has proved the secret and we have proved it back
(``tcpcopyd.net.auth``); from then on every batch both ways carries a tag. An interceptd
that does not answer within HELLO_WAIT (a C intercept), answers without the secret, or
gives a wrong proof is not used: nothing is registered with it, so nothing is sent to
its target, and the link retries with backoff. A refusal is logged with its reason.

IPv6 sessions are registered only on a link whose interceptd granted FEATURE_IPV6 in its
answer to our offer: a C intercept never receives one (their packets wait, counted as
held_no_link, and the link says once why).
"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from typing import Any

from shm.segment import LinkState
from tcpcopyd.net import auth, wire
from tcpcopyd.net.packet import endpoint, packed
from tcpcopyd.online.session import Session

log = logging.getLogger("tcpcopyd.control")

# reconnect delay bounds, seconds
RETRY_MIN = 0.2
RETRY_MAX = 5.0
# unsent control bytes above this mean interceptd stopped reading: drop the connection
MAX_PENDING = 8 << 20
RECV_SIZE = 256 * 1024
# how long a link with a secret waits for interceptd's answer to its offer, seconds
HELLO_WAIT = 2.0
# why an interceptd that cannot prove the secret is not used
NO_SECRET = ("give interceptd the same secret_file: with a secret, tcpcopyd uses no "
             "interceptd that cannot prove it")


class ControlLink:
    """The control connection to one interceptd: connecting (with backoff), the handshake, the
    registrations written out, the reply frames read in."""

    def __init__(self, host: str, port: int, epoll: select.epoll,
                 secret: bytes | None = None, payload: bool = False) -> None:
        self.host, self.port = host, port
        self.secret = secret
        self.want_payload = payload   # ask for the answers' first bytes (comparison test)
        self.payload = False          # interceptd sends them
        self.ipv6 = False             # interceptd takes IPv6 sessions (FEATURE_IPV6)
        self.answered = False         # its answer to our offer came
        self.up_at = 0.0              # when the link came up (monotonic)
        self._said_no_ipv6 = False
        self.handshake_until = 0.0   # waiting for the answer to our offer until then
        self.offered = 0             # the features our offer named
        self.nonce = b""             # our challenge to interceptd (with a secret)
        self.writer: auth.Tagger | None = None   # tags our batches (after the proofs)
        self.reader: auth.Tagger | None = None   # checks interceptd's
        self.batch = bytearray()     # registrations not yet tagged (with a secret)
        self.address = packed(host)
        self.epoll = epoll
        self.sock: socket.socket | None = None
        self.connecting = False
        self.up = False
        self.out = bytearray()
        self.inbuf = bytearray()
        self.retry_at = 0.0
        self.delay = RETRY_MIN
        self.connects = 0
        self.errors = 0
        self.since = time.time()     # wall-clock time of the last change up <-> down
        self.reason = ""             # why the last connection was lost or refused
        self._said_down = False
        self._events = 0

    @property
    def name(self) -> str:
        return f"interceptd {endpoint(self.address, self.port)}"

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def maybe_connect(self, now: float) -> bool:
        """Connect when it is time; True if the link came up (one that stops waiting for
        interceptd's answer to our offer comes up here)."""
        if self.handshake_until and now >= self.handshake_until:
            self._failed(now, f"did not answer our offer within {HELLO_WAIT:g}s (a C "
                              f"intercept?), so it cannot prove the shared secret ({NO_SECRET})")
            return False
        if self.sock is not None or now < self.retry_at:
            return False
        sock = socket.socket(socket.AF_INET6 if len(self.address) == 16 else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((self.host, self.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._failed(now, os.strerror(err))
            return False
        self.sock = sock
        self.connecting = True
        self._events = select.EPOLLOUT
        self.epoll.register(sock.fileno(), self._events)
        return False

    def on_event(self, ev: int, now: float) -> tuple[list[bytes], bool]:
        """Handle readiness; returns (reply headers received, connection just came up)."""
        came_up = False
        if self.sock is None:
            return [], False
        if self.connecting:
            if not ev & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
                return [], False
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._failed(now, os.strerror(err))
                return [], False
            self.connecting = False
            self.offered = (wire.FEATURE_AUTH if self.secret else 0) \
                | (wire.FEATURE_PAYLOAD if self.want_payload else 0) | wire.FEATURE_IPV6
            self.nonce = auth.nonce() if self.secret else b""
            self.out[:0] = wire.version_message() + wire.hello_message(self.offered) \
                + (wire.challenge_messages(self.nonce) if self.secret else b"")
            self._flush_out(now)
            if self.secret:
                self.handshake_until = now + HELLO_WAIT
                return [], False
            return [], self._come_up()
        headers: list[bytes] = []
        if ev & select.EPOLLIN:
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                data = None
            except OSError as e:
                self._failed(now, e.strerror or str(e))
                return [], False
            if data == b"":
                self._failed(now, "connection closed by interceptd")
                return [], False
            if data:
                self.inbuf += data
                try:
                    headers, came_up = self._take(now)
                except wire.ProtocolError as e:
                    self._failed(now, f"protocol error: {e}")
                    return [], False
                if self.sock is None:
                    return [], False
        elif ev & (select.EPOLLERR | select.EPOLLHUP):
            self._failed(now, "connection error")
            return [], False
        if ev & select.EPOLLOUT:
            self.flush(now)
        return headers, came_up

    def _take(self, now: float) -> tuple[list[bytes], bool]:
        """The reply headers read in (with a secret, only those whose tag checked), and
        whether the link came up with an answer to our offer."""
        extensions: list[Any] = []
        headers = wire.split_combined(self.inbuf, extensions, self.reader)
        if self.secret and not self.up and headers:
            raise wire.ProtocolError("reply headers before the handshake was over")
        came_up = False
        for ext in extensions:
            came_up |= self._on_extension(ext, now)
            if self.sock is None:
                return [], False
        if came_up and self.inbuf:    # what came behind the answer: tagged, checked now
            headers += wire.split_combined(self.inbuf, extensions, self.reader)
        return headers, came_up

    def _on_extension(self, ext: Any, now: float) -> bool:
        """interceptd's answer to our offer; True if the link came up with it (or, up
        already, may carry IPv6 sessions from now on: the live ones are registered
        again)."""
        if ext.kind == wire.EXT_REFUSED:
            self._failed(now, f"refused us: {wire.refusal_reason(ext)}")
            return False
        if ext.kind != wire.EXT_WELCOME:
            return False
        if self.writer is not None or self.answered:
            raise wire.ProtocolError("a second answer to our offer")
        self.answered = True
        self.payload = bool(ext.features & wire.FEATURE_PAYLOAD)
        ipv6 = bool(ext.features & wire.FEATURE_IPV6)
        newly_ipv6, self.ipv6 = ipv6 and not self.ipv6 and self.up, ipv6
        if ext.features & wire.FEATURE_AUTH and not self.secret:
            self._failed(now, f"it wants the shared secret "
                              f"({wire.REFUSAL_FIX[wire.SECRET_WANTED]})")
            return False
        if not self.secret:
            return self._come_up() or newly_ipv6
        if not ext.features & wire.FEATURE_AUTH:
            self._failed(now, f"it has no shared secret ({NO_SECRET})")
            return False
        server_nonce, proof = wire.welcome_proof(ext)
        seen = auth.transcript(self.nonce, server_nonce, self.offered, ext.features)
        if not auth.same(proof, auth.server_proof(self.secret, seen)):
            self._failed(now, "its proof of the shared secret is wrong (give both hosts the "
                              "same secret_file)")
            return False
        # not up yet: nothing but our first messages went before our proof
        self.out += wire.proof_messages(auth.client_proof(self.secret, seen))
        self.writer, self.reader = auth.pair(self.secret, seen, tcpcopyd=True)
        return self._come_up(" (shared secret proved both ways; every batch tagged)")

    def _come_up(self, how: str = "") -> bool:
        """The handshake is over: registrations may flow."""
        self.handshake_until = 0.0
        if self.up or self.sock is None:
            return False
        self.up = True
        self.up_at = time.monotonic()
        self.connects += 1
        self.since = time.time()
        self.delay = RETRY_MIN
        log.info("connected to %s%s", self.name, how)
        self._said_down = False
        return True

    def carries(self, s: Session) -> bool:
        """Whether the link is up for ``s``: for an IPv6 session, an interceptd that takes
        them."""
        return self.up and (len(s.client_ip) == 4 or self.ipv6)

    def register(self, s: Session) -> None:
        self._registration(s, wire.CLIENT_ADD, wire.CLIENT_ADD6)
        if len(s.client_ip) == 16 and self.up and not self.ipv6 and not self._said_no_ipv6 \
                and (self.answered or time.monotonic() - self.up_at >= HELLO_WAIT):
            # it answered our offer without IPv6, or never answered it (a C intercept)
            self._said_no_ipv6 = True
            log.warning("%s does not take IPv6 sessions (a C intercept, an older "
                        "interceptd, or one that cannot intercept IPv6 replies: see its "
                        "log): the IPv6 sessions it would serve are not copied "
                        "(their packets are counted as held_no_link)", self.name)

    def unregister(self, s: Session) -> None:
        self._registration(s, wire.CLIENT_DEL, wire.CLIENT_DEL6)

    def _registration(self, s: Session, kind: int, kind6: int) -> None:
        """A session's CLIENT_ADD or CLIENT_DEL queued, if the link carries it."""
        if not self.carries(s):
            return
        if len(s.client_ip) == 4:
            self.queue(wire.client_message(kind, s.client_ip, s.client_port, s.target_ip,
                                           s.target_port))
        else:
            self.queue(wire.registration6(kind6, s.client_ip, s.client_port, s.target_ip,
                                          s.target_port))

    def queue(self, messages: bytes) -> None:
        """Messages to interceptd, written out at the next flush (tagged, with a secret)."""
        if self.writer is None:
            self.out += messages
            return
        self.batch += messages
        if len(self.batch) >= wire.UNTAGGED_UP_MAX - wire.CLIENT_MSG_SIZE:
            self._seal()

    def _seal(self) -> None:
        """The registrations not yet tagged go out as one batch with its tag."""
        if self.batch and self.writer is not None:
            self.out += self.batch
            self.out += wire.tag_message(self.writer.tag(self.batch))
            self.batch.clear()

    def flush(self, now: float) -> None:
        if self.up:
            self._seal()
            self._flush_out(now)

    def _flush_out(self, now: float) -> None:
        if not self.out or self.sock is None:
            return
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self._failed(now, e.strerror or str(e))
            return
        del self.out[:sent]
        if len(self.out) > MAX_PENDING:
            self._failed(now, f"{len(self.out)} control bytes unsent: interceptd is not reading")
            return
        want = select.EPOLLIN | (select.EPOLLOUT if self.out else 0)
        if want != self._events:
            self._events = want
            self.epoll.modify(self.sock.fileno(), want)

    def _failed(self, now: float, reason: str) -> None:
        if self.up or not self.errors:
            self.since = time.time()
        self.close()
        self.errors += 1
        self.reason = reason
        if not self._said_down:
            log.warning("%s: %s; replication continues, reconnecting", self.name, reason)
            self._said_down = True
        self.connecting = False
        self.handshake_until = 0.0
        self.writer = self.reader = None
        self.answered = self.ipv6 = False
        self.out.clear()
        self.batch.clear()
        self.inbuf.clear()
        self.retry_at = now + self.delay
        self.delay = min(RETRY_MAX, self.delay * 2)

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.epoll.unregister(self.sock.fileno())
            except (OSError, ValueError):
                pass
            self.sock.close()
            self.sock = None
        self.up = False


class ControlGroup:
    """Links to every interceptd of ``-s``. A session is registered with the interceptd on
    its target's address when there is one, else with all of them (whichever sees the
    target's replies routes them to us); replies come from any. With ``per_server`` links
    to each (-C), a session always uses the same one of them."""

    def __init__(self, servers: list[tuple[str, int]], epoll: select.epoll,
                 per_server: int = 1, secret: bytes | None = None,
                 payload: bool = False) -> None:
        self.per_server = per_server
        self.links = [ControlLink(host, port, epoll, secret, payload) for host, port in servers
                      for _ in range(per_server)]
        self.addresses = {link.address for link in self.links}

    @property
    def up(self) -> bool:
        return any(link.up for link in self.links)

    @property
    def connects(self) -> int:
        return sum(link.connects for link in self.links)

    @property
    def errors(self) -> int:
        return sum(link.errors for link in self.links)

    def states(self) -> list[LinkState]:
        """Each interceptd's links, for status: how many are up, since when, why not."""
        by_server: dict[tuple[str, int], list[ControlLink]] = {}
        for link in self.links:
            by_server.setdefault((link.host, link.port), []).append(link)
        out = []
        for (host, port), links in by_server.items():
            up = sum(link.up for link in links)
            # since: when the oldest of the links in the server's current state got there
            settled = [link.since for link in links if link.up == bool(up)]
            reasons = [link.reason for link in links if not link.up and link.reason]
            out.append(LinkState(host, port, len(links), up, min(settled),
                                 sum(link.connects for link in links),
                                 sum(link.errors for link in links),
                                 reasons[0] if reasons else ""))
        return out

    def link_of(self, fd: int) -> ControlLink | None:
        for link in self.links:
            if link.sock is not None and link.sock.fileno() == fd:
                return link
        return None

    def maybe_connect(self, now: float) -> bool:
        """Connect the links whose time came; True if one came up."""
        came_up = False
        for link in self.links:
            came_up |= link.maybe_connect(now)
        return came_up

    def _links_of(self, s: Session) -> list[ControlLink]:
        """The links a session is registered on: with several interceptds, the one on its
        target's address if there is one (only it sees the replies), else all of them;
        with several links per interceptd, always the same one."""
        links = self.links
        if len(self.addresses) > 1 and s.target_ip in self.addresses:
            links = [link for link in links if link.address == s.target_ip]
        n = self.per_server
        return links if n == 1 else links[s.client_port % n::n]

    def carries(self, s: Session) -> bool:
        """Whether a link ``s`` is registered on is up (the engine sends nothing else)."""
        if len(self.links) == 1:
            return self.links[0].carries(s)
        return any(link.carries(s) for link in self._links_of(s))

    def register(self, s: Session) -> None:
        for link in self._links_of(s):
            link.register(s)

    def unregister(self, s: Session) -> None:
        for link in self._links_of(s):
            link.unregister(s)

    def flush(self, now: float) -> None:
        for link in self.links:
            link.flush(now)

    def close(self) -> None:
        for link in self.links:
            link.close()
