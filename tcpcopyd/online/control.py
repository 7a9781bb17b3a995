"""tcpcopyd's control connection to one interceptd: registers sessions (CLIENT_ADD/DEL) and
receives the target's reply headers. Non-blocking; reconnects with backoff, forever.

After the version message it offers our extensions (``wire.HELLO``). Without a shared
secret the link is up at once (a C intercept just ignores the offer). With one, the link
waits for interceptd's answer: a challenge is answered with the proof, and the link is
up; no answer within HELLO_WAIT means an interceptd without extensions (a C intercept),
and the link goes up unauthenticated, with a warning. A refusal is logged with its reason.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time

from shm.segment import LinkState
from tcpcopyd.net import wire
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


class ControlLink:
    """The control connection to one interceptd: connecting (with backoff), the handshake, the
    registrations written out, the reply frames read in."""

    def __init__(self, host: str, port: int, epoll: select.epoll,
                 secret: bytes | None = None, payload: bool = False) -> None:
        self.host, self.port = host, port
        self.secret = secret
        self.want_payload = payload   # ask for the answers' first bytes (comparison test)
        self.payload = False          # interceptd sends them
        self.handshake_until = 0.0   # waiting for the answer to our offer until then
        self._warned_no_auth = False
        self.address = socket.inet_aton(host)
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
        return f"interceptd {self.host}:{self.port}"

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def maybe_connect(self, now: float) -> bool:
        """Connect when it is time; True if the link came up (one that stops waiting for
        interceptd's answer to our offer comes up here)."""
        if self.handshake_until and now >= self.handshake_until:
            if not self._warned_no_auth:
                log.warning("%s did not answer our offer (a C intercept?): registering "
                            "sessions without proving the shared secret", self.name)
                self._warned_no_auth = True
            return self._come_up(" (no extensions)")
        if self.sock is not None or now < self.retry_at:
            return False
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
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
            self.out[:0] = wire.version_message() + wire.hello_message(
                (wire.FEATURE_AUTH if self.secret else 0)
                | (wire.FEATURE_PAYLOAD if self.want_payload else 0))
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
                extensions: list[tuple] = []
                try:
                    headers = wire.split_combined(self.inbuf, extensions)
                except wire.ProtocolError as e:
                    self._failed(now, f"protocol error: {e}")
                    return headers, False
                for ext in extensions:
                    came_up |= self._on_extension(ext, now)
                    if self.sock is None:
                        return [], False
        elif ev & (select.EPOLLERR | select.EPOLLHUP):
            self._failed(now, "connection error")
            return [], False
        if ev & select.EPOLLOUT:
            self.flush(now)
        return headers, came_up

    def _on_extension(self, ext: tuple, now: float) -> bool:
        """interceptd's answer to our offer; True if the link came up with it."""
        if ext.kind == wire.EXT_REFUSED:
            self._failed(now, f"refused us: {wire.refusal_reason(ext)}")
            return False
        if ext.kind != wire.EXT_WELCOME:
            return False
        self.payload = bool(ext.features & wire.FEATURE_PAYLOAD)
        if ext.features & wire.FEATURE_AUTH:
            if not self.secret:
                self._failed(now, f"it wants the shared secret "
                                  f"({wire.REFUSAL_FIX[wire.SECRET_WANTED]})")
                return False
            # not up yet: nothing but our first messages went before the proof
            self.out += wire.proof_messages(self.secret, ext.body[:wire.NONCE_SIZE])
            return self._come_up(" (shared secret proved)")
        return self._come_up()

    def _come_up(self, how: str = "") -> bool:
        """The handshake is over: registrations may flow."""
        self.handshake_until = 0.0
        if self.up or self.sock is None:
            return False
        self.up = True
        self.connects += 1
        self.since = time.time()
        self.delay = RETRY_MIN
        log.info("connected to %s%s", self.name, how)
        self._said_down = False
        return True

    def register(self, s: Session) -> None:
        if self.up:
            self.out += wire.client_message(wire.CLIENT_ADD, s.client_ip, s.client_port,
                                            s.target_ip, s.target_port)

    def unregister(self, s: Session) -> None:
        if self.up:
            self.out += wire.client_message(wire.CLIENT_DEL, s.client_ip, s.client_port,
                                            s.target_ip, s.target_port)

    def flush(self, now: float) -> None:
        if self.up:
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
        self.out.clear()
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
            return self.links[0].up
        return any(link.up for link in self._links_of(s))

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
