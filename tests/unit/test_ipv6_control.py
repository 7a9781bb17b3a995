"""IPv6 on the control channel: the FEATURE_IPV6 offer and its grant, IPv6 registrations
and IPv6 reply frames between tcpcopyd's link and interceptd's control server (real
sockets, over ::1 too), and what neither side does without the other's word."""
import select
import socket
import time

import pytest

from interceptd import counters as IC
from interceptd.control import ControlServer
from interceptd.router import Router
from tcpcopyd.net import packet as P
from tcpcopyd.net import wire
from tcpcopyd.online.control import ControlLink
from tcpcopyd.online.session import Session

C6 = socket.inet_pton(socket.AF_INET6, "fd18:1::1")
T6 = socket.inet_pton(socket.AF_INET6, "fd18:2::2")
C4, T4 = socket.inet_aton("198.18.1.1"), socket.inet_aton("198.18.2.2")
SECRET = b"0123456789abcdef-shared"


class Server:
    """interceptd's control side, pumped by hand; ``ipv6``: its IPv6 rules are in place."""

    def __init__(self, host: str = "127.0.0.1", ipv6: bool = True, secret=None) -> None:
        import ipaddress
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family)
        self.listener.bind((host, 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.ep = select.epoll()
        self.counters = [0] * len(IC.NAMES)
        self.router = Router(self.counters)
        allow = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
        self.control = ControlServer(self.listener, self.ep, self.router, self.counters, 0,
                                     allow, secret, ipv6=ipv6)

    def pump(self, rounds: int = 5) -> None:
        for _ in range(rounds):
            now = time.monotonic()
            for fd, ev in self.ep.poll(0.01):
                self.control.on_event(fd, ev, now)
            self.control.flush()

    def close(self) -> None:
        self.control.close()
        self.listener.close()
        self.ep.close()


def session(cip: bytes, tip: bytes, port: int = 40000) -> Session:
    return Session((cip, port, tip, 80), cip, port, tip, 80, 0, 0.0)


def connect(srv: Server, host: str, secret=None) -> tuple[ControlLink, select.epoll]:
    """A link to ``srv`` that came up and got interceptd's answer to its offer."""
    ep = select.epoll()
    link = ControlLink(host, srv.port, ep, secret)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not (link.up and link.answered):
        now = time.monotonic()
        link.maybe_connect(now)
        for _fd, ev in ep.poll(0.01):
            link.on_event(ev, now)
        srv.pump(1)
    assert link.up and link.answered
    return link, ep


def replies(link: ControlLink, ep: select.epoll, n: int) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + 3
    while len(got) < n and time.monotonic() < deadline:
        for _fd, ev in ep.poll(0.05):
            got += link.on_event(ev, time.monotonic())[0]
    return got


@pytest.mark.parametrize("host, secret", [("127.0.0.1", None), ("::1", None),
                                          ("::1", SECRET)], ids=["v4", "v6", "v6-secret"])
def test_ipv6_sessions_are_registered_and_their_replies_come_back_whole(host, secret):
    srv = Server(host, secret=secret)
    link, ep = connect(srv, host, secret)
    try:
        assert link.ipv6
        six, four = session(C6, T6), session(C4, T4)
        assert link.carries(six) and link.carries(four)
        link.register(six)
        link.register(four)
        link.flush(time.monotonic())
        srv.pump()
        assert set(srv.router.routes) == {C6 + (40000).to_bytes(2, "big"),
                                          C4 + (40000).to_bytes(2, "big")}
        r6 = wire.reply_record(P.build(T6, C6, 80, 40000, 7, 8, P.ACK | P.PSH, 500, b"",
                                       b"HTTP/1.1 200 OK"), wire.PREFIX_MAX)
        r4 = wire.reply_header(P.build(T4, C4, 80, 40000, 7, 8, P.ACK, 500))
        for r in (r6, r4, r6):
            srv.router.route(r, time.monotonic())
        srv.pump()
        # the payload bytes only to a link that asked for them
        assert replies(link, ep, 3) == [r6[:wire.REPLY6_SIZE], r4, r6[:wire.REPLY6_SIZE]]
        link.unregister(six)
        link.flush(time.monotonic())
        srv.pump()
        assert set(srv.router.routes) == {C4 + (40000).to_bytes(2, "big")}
        assert srv.counters[IC.INDEX["bad_messages"]] == 0
    finally:
        link.close()
        ep.close()
        srv.close()


def test_an_interceptd_without_ipv6_gets_no_ipv6_session(caplog):
    srv = Server(ipv6=False)
    link, ep = connect(srv, "127.0.0.1")
    try:
        six = session(C6, T6)
        assert not link.ipv6 and not link.carries(six) and link.carries(session(C4, T4))
        link.register(six)
        link.register(session(C6, T6, 40002))
        link.flush(time.monotonic())
        srv.pump()
        assert not srv.router.routes
        said = [r for r in caplog.records if "does not take IPv6 sessions" in r.message]
        assert len(said) == 1
    finally:
        link.close()
        ep.close()
        srv.close()


def test_an_ipv6_registration_nobody_granted_or_cut_short_ends_the_connection():
    for granted, messages in [
            (False, wire.registration6(wire.CLIENT_ADD6, C6, 1, T6, 80)),
            (True, wire.registration6(wire.CLIENT_ADD6, C6, 1, T6, 80)[:28]
             + wire.client_message(wire.CLIENT_ADD, C4, 1, T4, 80))]:
        srv = Server(ipv6=granted)
        c = socket.create_connection(("127.0.0.1", srv.port))
        try:
            c.sendall(wire.version_message() + wire.hello_message(wire.FEATURE_IPV6))
            srv.pump()
            c.sendall(messages)
            srv.pump()
            c.settimeout(2)
            data = b""
            try:
                while chunk := c.recv(4096):
                    data += chunk
            except ConnectionResetError:
                pass
            assert not srv.router.routes and len(srv.control) == 0
        finally:
            c.close()
            srv.close()


def test_a_refused_ipv6_address_is_logged_once_a_minute_like_an_ipv4_one():
    from types import SimpleNamespace

    from interceptd.shared import LOGGED_SIZE, RefusalLog
    log = RefusalLog(SimpleNamespace(mm=bytearray(LOGGED_SIZE), extra_off=0))
    for address in (C6, C4):
        assert log.due(address, 100.0, 60.0)
        assert not log.due(address, 130.0, 60.0)
        assert log.due(address, 161.0, 60.0)
