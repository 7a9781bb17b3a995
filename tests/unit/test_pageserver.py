"""The master's metrics page server (metrics_listen) on loopback: the page, wrong paths and
methods, and clients that send too much or nothing at all never hold it."""
from __future__ import annotations

import select
import socket
import time

import pytest

from tcpcopyd.service import pageserver
from tcpcopyd.service.pageserver import PageServer


@pytest.fixture
def server():
    s = PageServer("127.0.0.1", 0, lambda: "metric 1\n", "text/plain; version=0.0.4")
    yield s
    s.close()


def serve(server: PageServer, until, timeout: float = 5.0) -> None:
    """The master's loop, until ``until()``."""
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        r, w, _ = select.select(server.readers(), server.writers(), [], 0.05)
        server.on_ready({*r, *w})


def ask(server: PageServer, request: bytes) -> bytes:
    c = socket.create_connection(server.listener.getsockname())
    c.sendall(request)
    c.setblocking(False)
    got = bytearray()

    def done() -> bool:
        try:
            data = c.recv(65536)
        except BlockingIOError:
            return False
        got.extend(data)
        return not data
    serve(server, done)
    c.close()
    return bytes(got)


def test_get_metrics_is_the_page(server):
    answer = ask(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Type: text/plain; version=0.0.4" in head
    assert body == b"metric 1\n"
    assert server.served == 1


def test_other_paths_methods_and_garbage_are_refused(server):
    assert ask(server, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert ask(server, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert ask(server, b"\x00\x01\x02\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert ask(server, b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 3000).startswith(
        b"HTTP/1.1 431")
    assert server.served == 0


def test_silent_clients_are_dropped_and_never_exceed_the_limit(server, monkeypatch):
    monkeypatch.setattr(pageserver, "CLIENT_TIMEOUT", 0.3)
    addr = server.listener.getsockname()
    silent = [socket.create_connection(addr) for _ in range(pageserver.MAX_CLIENTS + 4)]
    serve(server, lambda: False, timeout=0.2)
    assert len(server.clients) <= pageserver.MAX_CLIENTS
    serve(server, lambda: not server.clients, timeout=3)
    assert not server.clients            # dropped at their deadline
    for s in silent:
        s.close()
    assert ask(server, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")
