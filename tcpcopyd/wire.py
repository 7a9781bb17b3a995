"""The control-channel protocol between tcpcopyd and interceptd (tcpcopy 1.x, version 6).

tcpcopyd -> interceptd: 14-byte messages ``u32 client_ip, u16 client_port, u16 type,
u32 target_ip, u16 target_port`` (network byte order, packed). The first message on a
connection is the version handshake: all fields zero but ``type = VERSION``.

interceptd -> tcpcopyd: combined frames, ``u16 count`` then ``count`` x 64-byte reply
headers (20-byte IPv4 header with the wire total length, then the TCP header with its
options cut or zero-padded to 44 bytes); ``1 <= count <= MAX_COMBINED``.
"""
from __future__ import annotations

from shm.record import Record

# default TCP port interceptd listens on
DEFAULT_PORT = 36524
# internal protocol version spoken (tcpcopy 1.x / intercept 1.0)
VERSION = 6
# message types, tcpcopyd -> interceptd
CLIENT_ADD = 1
CLIENT_DEL = 2
# size of one tcpcopyd -> interceptd message
CLIENT_MSG_SIZE = 14
# size of one reply header, interceptd -> tcpcopyd
REPLY_SIZE = 64
# bytes of TCP header (with options) kept in a reply header
REPLY_TCP_SIZE = REPLY_SIZE - 20
# most reply headers in one combined frame
MAX_COMBINED = 16

# tcpcopyd -> interceptd, one message
CLIENT_MSG = Record("ClientMessage", (
    ("client_ip", "4s"),     # the session's client as the target sees it
    ("client_port", "H"),
    ("type", "H"),           # CLIENT_ADD, CLIENT_DEL; VERSION in the first message
    ("target_ip", "4s"),
    ("target_port", "H"),
), order="!")
assert CLIENT_MSG.size == CLIENT_MSG_SIZE
# interceptd -> tcpcopyd: a combined frame's head, then ``count`` reply headers
COMBINED_HEAD = Record("CombinedHead", (
    ("count", "H"),          # 1..MAX_COMBINED
), order="!")


class ProtocolError(ValueError):
    """A control-channel message that breaks the protocol."""


def client_message(kind: int, client_ip: bytes, client_port: int, target_ip: bytes,
                   target_port: int) -> bytes:
    return CLIENT_MSG.pack(client_ip, client_port, kind, target_ip, target_port)


def version_message() -> bytes:
    return CLIENT_MSG.pack(b"\0\0\0\0", 0, VERSION, b"\0\0\0\0", 0)


def parse_client_messages(buf: bytearray) -> list[tuple[int, bytes, int, bytes, int]]:
    """Consume whole 14-byte messages from ``buf``: (type, client_ip, client_port,
    target_ip, target_port) each. A partial message stays in ``buf``."""
    n = len(buf) // CLIENT_MSG_SIZE
    out = []
    for i in range(n):
        m = CLIENT_MSG.unpack_from(buf, i * CLIENT_MSG_SIZE)
        out.append((m.type, m.client_ip, m.client_port, m.target_ip, m.target_port))
    del buf[:n * CLIENT_MSG_SIZE]
    return out


def reply_header(ip_packet: bytes | memoryview) -> bytes:
    """The 64-byte reply header of an IPv4/TCP packet seen by interceptd.

    IP options, if any, are removed (IHL set to 5, total length reduced to match) so the
    receiver finds the TCP header at offset 20 and the payload length stays right.
    """
    if len(ip_packet) < 40:
        raise ProtocolError(f"{len(ip_packet)}-byte packet is too short for IPv4+TCP")
    ihl = (ip_packet[0] & 0x0F) * 4
    if ihl == 20:
        head = bytes(ip_packet[:20])
    else:
        if ihl < 20 or len(ip_packet) < ihl + 20:
            raise ProtocolError(f"bad IP header length {ihl}")
        head = bytearray(ip_packet[:20])
        head[0] = 0x45
        tot = int.from_bytes(head[2:4], "big") - (ihl - 20)
        head[2:4] = tot.to_bytes(2, "big")
        head = bytes(head)
    tcp = bytes(ip_packet[ihl:ihl + REPLY_TCP_SIZE])
    if len(tcp) < REPLY_TCP_SIZE:
        tcp += bytes(REPLY_TCP_SIZE - len(tcp))
    return head + tcp


def combine(headers: list[bytes]) -> bytes:
    """Frame reply headers as combined frames of at most MAX_COMBINED each."""
    out = bytearray()
    for i in range(0, len(headers), MAX_COMBINED):
        chunk = headers[i:i + MAX_COMBINED]
        out += COMBINED_HEAD.pack(len(chunk))
        for h in chunk:
            out += h
    return bytes(out)


def split_combined(buf: bytearray) -> list[bytes]:
    """Consume whole combined frames from ``buf``; returns the reply headers.

    Raises ProtocolError on a count of 0 or above MAX_COMBINED (the stream cannot be
    resynchronised after that: the caller must drop the connection).
    """
    out: list[bytes] = []
    pos, n = 0, len(buf)
    while n - pos >= 2:
        count = COMBINED_HEAD.unpack_from(buf, pos).count
        if count == 0 or count > MAX_COMBINED:
            del buf[:pos]
            raise ProtocolError(f"combined frame count {count} outside 1..{MAX_COMBINED}")
        need = 2 + count * REPLY_SIZE
        if n - pos < need:
            break
        base = pos + 2
        for i in range(count):
            out.append(bytes(buf[base + i * REPLY_SIZE:base + (i + 1) * REPLY_SIZE]))
        pos += need
    del buf[:pos]
    return out
