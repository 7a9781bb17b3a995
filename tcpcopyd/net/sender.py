"""Raw-socket sending of built IPv4 and IPv6 packets (IPPROTO_RAW: the header is ours;
an IPv6 one is opened at the first IPv6 packet)."""
from __future__ import annotations

import logging
import socket
import time

from tcpcopyd.net.errors import SendError

log = logging.getLogger("tcpcopyd.sender")


def open_raw_socket(sndbuf: int = 8 << 20, family: int = socket.AF_INET) -> socket.socket:
    try:
        sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except PermissionError:
        raise SendError("raw sockets need root (or CAP_NET_RAW)") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    return sock


class RawSender:
    """Sends complete IPv4 and IPv6 packets; the kernel routes them by destination (and
    fills the IPv4 checksum and ID)."""

    def __init__(self, sock: socket.socket | None = None, ipv6: bool = False) -> None:
        """``ipv6``: open the IPv6 socket now (a worker that gave up its capabilities
        could not open it at its first IPv6 packet; that send fails, counted)."""
        self.sock = sock or open_raw_socket()
        self.sock6 = open_raw_socket(family=socket.AF_INET6) if ipv6 else None
        self._addr: dict[bytes, tuple[str, int]] = {}
        self._last_error_log = 0.0

    def send(self, packet: bytearray, dst: bytes) -> bool:
        addr = self._addr.get(dst)
        if addr is None:
            if len(self._addr) > 4096:
                self._addr.clear()
            family = socket.AF_INET if len(dst) == 4 else socket.AF_INET6
            addr = self._addr[dst] = (socket.inet_ntop(family, dst), 0)
        try:
            if len(dst) == 4:
                self.sock.sendto(packet, addr)
            else:
                if self.sock6 is None:
                    self.sock6 = open_raw_socket(family=socket.AF_INET6)
                self.sock6.sendto(packet, addr)
            return True
        except OSError as e:
            now = time.monotonic()
            if now - self._last_error_log > 5:
                self._last_error_log = now
                log.warning("sending to %s failed: %s", addr[0], e.strerror or e)
            return False
