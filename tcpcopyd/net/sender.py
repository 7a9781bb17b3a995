"""Raw-socket sending of built IPv4 packets (IP_HDRINCL via IPPROTO_RAW)."""
from __future__ import annotations

import logging
import socket
import time

from tcpcopyd.net.errors import SendError

log = logging.getLogger("tcpcopyd.sender")


def open_raw_socket(sndbuf: int = 8 << 20) -> socket.socket:
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except PermissionError:
        raise SendError("raw sockets need root (or CAP_NET_RAW)") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    return sock


class RawSender:
    """Sends complete IPv4 packets; the kernel routes them by destination and fills the IP
    checksum and ID."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock or open_raw_socket()
        self._addr: dict[bytes, tuple[str, int]] = {}
        self._last_error_log = 0.0

    def send(self, packet: bytearray, dst: bytes) -> bool:
        addr = self._addr.get(dst)
        if addr is None:
            addr = self._addr[dst] = (socket.inet_ntoa(dst), 0)
        try:
            self.sock.sendto(packet, addr)
            return True
        except OSError as e:
            now = time.monotonic()
            if now - self._last_error_log > 5:
                self._last_error_log = now
                log.warning("sending to %s failed: %s", addr[0], e.strerror or e)
            return False
