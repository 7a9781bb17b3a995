"""A master's one-page HTTP server (``metrics_listen``): ``GET /metrics`` answers the page
its ``render()`` makes (Prometheus's text format), anything else 404 or 405.

It lives in the master's select loop, never blocking it: non-blocking sockets, at most
MAX_CLIENTS connections, a request bounded to MAX_REQUEST bytes and CLIENT_TIMEOUT seconds
(a slow or silent client is dropped, never waited for), one request per connection."""
from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

log = logging.getLogger("tcpcopyd.metrics")

MAX_CLIENTS = 16
MAX_REQUEST = 8192
CLIENT_TIMEOUT = 5.0
PATH = b"/metrics"


class Client:
    """One HTTP connection to the page server: what it sent, what it is sent."""

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.out = b""
        self.draining = False    # answered before it finished sending: read, discard
        self.deadline = now + CLIENT_TIMEOUT


class PageServer:
    """The master's one-page HTTP server (metrics_listen), served from the master's loop without
    threads."""

    def __init__(self, host: str, port: int, render: Callable[[], str],
                 content_type: str) -> None:
        self.render, self.content_type = render, content_type
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))      # OSError: the caller says which setting
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.clients: dict[int, Client] = {}
        self.served = 0

    def readers(self) -> list[int]:
        return [self.listener.fileno(), *(fd for fd, c in self.clients.items() if not c.out)]

    def writers(self) -> list[int]:
        return [fd for fd, c in self.clients.items() if c.out]

    def on_ready(self, fds: set[int]) -> None:
        now = time.monotonic()
        if self.listener.fileno() in fds:
            self._accept(now)
        for fd in list(self.clients):
            if fd in fds:
                self._serve(fd)
        for fd, c in list(self.clients.items()):
            if now > c.deadline:
                self._close(fd)

    def _accept(self, now: float) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:   # out of file descriptors: try again next time
                log.warning("metrics: cannot accept: %s", e.strerror)
                return
            if len(self.clients) >= MAX_CLIENTS:
                sock.close()
                continue
            sock.setblocking(False)
            self.clients[sock.fileno()] = Client(sock, now)

    def _serve(self, fd: int) -> None:
        c = self.clients[fd]
        try:
            if c.out:
                sent = c.sock.send(c.out)
                c.out = c.out[sent:]
                if not c.out:
                    if c.draining:   # a close now would reset the answer away
                        c.sock.shutdown(socket.SHUT_WR)
                    else:
                        self._close(fd)
                return
            data = c.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(fd)
            return
        if not data:
            self._close(fd)
            return
        if c.draining:
            return
        c.inbuf += data
        if b"\r\n\r\n" not in c.inbuf and b"\n\n" not in c.inbuf:
            if len(c.inbuf) >= MAX_REQUEST:
                c.out = response(431, "Request Header Fields Too Large")
                c.draining = True
                self._serve(fd)
            return
        c.out = self.answer(bytes(c.inbuf))
        self._serve(fd)

    def answer(self, request: bytes) -> bytes:
        parts = request.split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return response(400, "Bad Request")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != PATH:
            return response(404, "Not Found", "only /metrics is served here\n")
        if method not in (b"GET", b"HEAD"):
            return response(405, "Method Not Allowed", extra="Allow: GET, HEAD\r\n")
        try:
            page = self.render()
        except Exception:
            log.exception("metrics: the page could not be made")
            return response(500, "Internal Server Error")
        self.served += 1
        return response(200, "OK", page, self.content_type, head_only=method == b"HEAD")

    def _close(self, fd: int) -> None:
        c = self.clients.pop(fd, None)
        if c is not None:
            c.sock.close()

    def close(self) -> None:
        for fd in list(self.clients):
            self._close(fd)
        self.listener.close()


def response(code: int, reason: str, body: str = "", content_type: str = "text/plain",
             extra: str = "", head_only: bool = False) -> bytes:
    data = (body or f"{code} {reason}\n").encode()
    head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n{extra}\r\n").encode()
    return head if head_only else head + data
