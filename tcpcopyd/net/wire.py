"""The control-channel protocol between tcpcopyd and interceptd (tcpcopy 1.x, version 6).

tcpcopyd -> interceptd: 14-byte messages ``u32 client_ip, u16 client_port, u16 type,
u32 target_ip, u16 target_port`` (network byte order, packed). The first message on a
connection is the version handshake: all fields zero but ``type = VERSION``.

interceptd -> tcpcopyd: combined frames, ``u16 count`` then ``count`` x 64-byte reply
headers (20-byte IPv4 header with the wire total length, then the TCP header with its
options cut or zero-padded to 44 bytes); ``1 <= count <= MAX_COMBINED``.

Extensions, negotiated (a peer that did not ask never sees one):
- tcpcopyd sends HELLO right after the version message: a 14-byte message of type HELLO
  whose client-address field holds the features it offers (FEATURE_AUTH: it has the shared
  secret; then CHALLENGE messages with its nonce follow). A C intercept 1.0 logs "unknown
  msg type" once and goes on.
- interceptd answers a HELLO, and only a HELLO, with one extension frame: ``u16 EXT_MARK``
  (never a count) then a 64-byte EXT record: WELCOME (the features it grants; with
  FEATURE_AUTH, its nonce and its proof of the secret) or REFUSED (why, in words), after
  which it closes the connection.
- FEATURE_AUTH: both sides prove the secret, and every batch after the handshake ends
  with a tag (``tcpcopyd.net.auth`` says how): tcpcopyd's batches with a 14-byte message of
  type TAG whose 12 free bytes are the tag, interceptd's with a tag frame, ``u16
  TAG_MARK`` then the tag.
- FEATURE_PAYLOAD (tcpcopyd's comparison test): offered in the HELLO, granted in the
  WELCOME. interceptd then sends the first data segment of each of the target's answers
  (its ack differs from the previous data segment's) as a payload frame: ``u16
  PAYLOAD_MARK, u16 length`` (at most PREFIX_MAX), its 64-byte reply header, then the first
  ``length`` bytes of its payload. Other replies travel in combined frames as before.
- FEATURE_IPV6: offered in the HELLO, granted in the WELCOME. tcpcopyd then registers
  IPv6 sessions as three messages of type CLIENT_ADD6 (or CLIENT_DEL6) whose 36 free bytes
  are the client's address (16 bytes) and port, then the target's address and port; and
  interceptd sends each reply of an IPv6 session as an IPv6 frame: ``u16 V6_MARK, u16
  length`` (the payload bytes after the header, 0 unless FEATURE_PAYLOAD wants them), the
  84-byte IPv6 reply header (the 40-byte IPv6 header, its extension headers removed and
  its payload length reduced to match, then the TCP header cut or padded to 44 bytes),
  then the payload bytes. IPv4 sessions travel as above, byte for byte the C protocol.
"""
from __future__ import annotations

import struct
from typing import Any, Final

from shm.record import Record
from tcpcopyd.net import auth
from tcpcopyd.net import packet as P

# default TCP port interceptd listens on
DEFAULT_PORT = 36524
# internal protocol version spoken (tcpcopy 1.x / intercept 1.0)
VERSION: Final = 6
# message types, tcpcopyd -> interceptd
CLIENT_ADD: Final = 1
CLIENT_DEL: Final = 2
# size of one tcpcopyd -> interceptd message
CLIENT_MSG_SIZE: Final = 14
# size of one reply header, interceptd -> tcpcopyd
REPLY_SIZE: Final = 64
# bytes of TCP header (with options) kept in a reply header
REPLY_TCP_SIZE: Final = REPLY_SIZE - 20
# most reply headers in one combined frame
MAX_COMBINED: Final = 16

# tcpcopyd -> interceptd, one message
CLIENT_MSG = Record("ClientMessage", (
    ("client_ip", "4s"),     # the session's client as the target sees it
    ("client_port", "H"),
    ("type", "H"),           # CLIENT_ADD, CLIENT_DEL; VERSION in the first message
    ("target_ip", "4s"),
    ("target_port", "H"),
), order="!")
assert CLIENT_MSG.size == CLIENT_MSG_SIZE
_CLIENT_MSG: Final = CLIENT_MSG.struct     # (the named tuple costs more than the message)
# interceptd -> tcpcopyd: a combined frame's head, then ``count`` reply headers
COMBINED_HEAD = Record("CombinedHead", (
    ("count", "H"),          # 1..MAX_COMBINED, or EXT_MARK
), order="!")
# a frame's first field: a count or a mark
_U16: Final = struct.Struct("!H")

# extensions: message types, tcpcopyd -> interceptd
HELLO = 0x4558
PROOF = 0x4559
CHALLENGE = 0x455A
TAG = 0x455B
# the handshake's messages (HELLO aside): taken before the handshake is over, never after
HANDSHAKE_KINDS = (CHALLENGE, PROOF)
# features (bit flags) in a HELLO and in a WELCOME
FEATURE_AUTH = 1
FEATURE_PAYLOAD = 2
FEATURE_IPV6 = 4
# IPv6 registrations (FEATURE_IPV6): REGISTRATION6_PARTS messages of one of these types
CLIENT_ADD6: Final = 0x455C
CLIENT_DEL6: Final = 0x455D
REGISTRATION6_PARTS: Final = 3
# in place of a combined frame's count: an IPv6 reply record follows (FEATURE_IPV6)
V6_MARK: Final = 0xFFFC
V6_HEAD = Record("V6Head", (
    ("mark", "H"),           # V6_MARK
    ("length", "H"),         # payload bytes after the IPv6 reply header
), order="!")
# size of one IPv6 reply header: the IPv6 header, then the TCP part of a reply header
REPLY6_SIZE: Final = 40 + REPLY_TCP_SIZE
# in place of a combined frame's count: a payload frame follows
PAYLOAD_MARK: Final = 0xFFFE
PAYLOAD_HEAD = Record("PayloadHead", (
    ("mark", "H"),           # PAYLOAD_MARK
    ("length", "H"),         # bytes of payload after the reply header
), order="!")
# most payload bytes of an answer forwarded
PREFIX_MAX: Final = 256
# in place of a combined frame's count: the tag of the bytes since the last one follows
TAG_MARK: Final = 0xFFFD
TAG_FRAME_SIZE: Final = 2 + auth.TAG_SIZE
# most bytes a side takes before their tag: tcpcopyd tags its registrations at least this
# often; interceptd tags every flush, which the router bounds to PEER_MAX_PENDING (4 MiB)
UNTAGGED_UP_MAX: Final = 64 << 10
UNTAGGED_DOWN_MAX: Final = 8 << 20
# in place of a combined frame's count: one extension record follows
EXT_MARK: Final = 0xFFFF
EXT = Record("Extension", (
    ("kind", "H"),           # EXT_WELCOME or EXT_REFUSED
    ("pad", "2x"),
    ("features", "I"),       # WELCOME: what it wants (FEATURE_AUTH: a proof); REFUSED: why
    ("body", "56s"),         # WELCOME: the nonce; REFUSED: a few words, UTF-8, NUL-padded
), order="!")
assert EXT.size == REPLY_SIZE
EXT_WELCOME = 1
EXT_REFUSED = 2
# why a peer is refused (a REFUSED record's features field), and what fixes it
NOT_ALLOWED = 1
SECRET_WANTED = 2
WRONG_PROOF = 3
REFUSAL_FIX = {
    NOT_ALLOWED: "add our address to allow in /etc/interceptd.conf on the target host",
    SECRET_WANTED: "give tcpcopyd the same secret_file as interceptd",
    WRONG_PROOF: "give both hosts the same secret_file",
}
# a nonce or a proof (32 bytes) travels in the 12 free bytes of this many messages
PROOF_PARTS = 3
CHALLENGE_PARTS = 3


class ProtocolError(ValueError):
    """A control-channel message that breaks the protocol."""


class TagError(ProtocolError):
    """A batch whose tag does not check (forged or changed on the way)."""


def client_message(kind: int, client_ip: bytes, client_port: int, target_ip: bytes,
                   target_port: int) -> bytes:
    return CLIENT_MSG.pack(client_ip, client_port, kind, target_ip, target_port)


def version_message() -> bytes:
    return CLIENT_MSG.pack(b"\0\0\0\0", 0, VERSION, b"\0\0\0\0", 0)


def hello_message(features: int) -> bytes:
    return CLIENT_MSG.pack(features.to_bytes(4, "big"), 0, HELLO, b"\0\0\0\0", 0)


def parts_messages(kind: int, blob: bytes) -> bytes:
    """``blob`` in the 12 free bytes of messages of type ``kind`` (zero-padded)."""
    blob = blob.ljust(-(-len(blob) // 12) * 12, b"\0")
    return b"".join(CLIENT_MSG.pack(part[0:4], int.from_bytes(part[4:6], "big"), kind,
                                    part[6:10], int.from_bytes(part[10:12], "big"))
                    for part in (blob[i:i + 12] for i in range(0, len(blob), 12)))


def challenge_messages(client_nonce: bytes) -> bytes:
    return parts_messages(CHALLENGE, client_nonce)


def proof_messages(proof: bytes) -> bytes:
    """The PROOF messages carrying tcpcopyd's proof (``auth.client_proof``)."""
    return parts_messages(PROOF, proof)


def proof_part(client_ip: bytes, client_port: int, target_ip: bytes, target_port: int
               ) -> bytes:
    """The 12 bytes one PROOF, CHALLENGE or TAG message carries (its fields as
    ``parse_client_messages`` gives them)."""
    return client_ip + client_port.to_bytes(2, "big") + target_ip + \
        target_port.to_bytes(2, "big")


def registration6(kind: int, client_ip: bytes, client_port: int, target_ip: bytes,
                  target_port: int) -> bytes:
    """An IPv6 session's CLIENT_ADD6 or CLIENT_DEL6: its REGISTRATION6_PARTS messages."""
    return parts_messages(kind, client_ip + client_port.to_bytes(2, "big") + target_ip
                          + target_port.to_bytes(2, "big"))


def registration6_fields(parts: bytes) -> tuple[bytes, int, bytes, int]:
    """(client address, client port, target address, target port) of the 36 bytes that
    the parts of an IPv6 registration carry (``proof_part`` of each, joined)."""
    return (parts[:16], int.from_bytes(parts[16:18], "big"), parts[18:34],
            int.from_bytes(parts[34:36], "big"))


def tag_message(tag: bytes) -> bytes:
    """tcpcopyd's end of a batch: its tag."""
    return parts_messages(TAG, tag)


def tag_frame(tag: bytes) -> bytes:
    """interceptd's end of a batch: its tag."""
    return COMBINED_HEAD.pack(TAG_MARK) + tag


def welcome_frame(granted: int, server_nonce: bytes = b"", proof: bytes = b"") -> bytes:
    return ext_frame(EXT_WELCOME, granted, server_nonce + proof)


def welcome_proof(ext: Any) -> tuple[bytes, bytes]:
    """(interceptd's nonce, its proof) from a WELCOME record."""
    return (ext.body[:auth.NONCE_SIZE],
            ext.body[auth.NONCE_SIZE:auth.NONCE_SIZE + auth.SERVER_PROOF_SIZE])


def ext_frame(kind: int, features: int = 0, body: bytes = b"") -> bytes:
    return COMBINED_HEAD.pack(EXT_MARK) + EXT.pack(kind, features, body[:56])


def refused_frame(why: int, words: str) -> bytes:
    return ext_frame(EXT_REFUSED, why, words.encode()[:56])


def refusal_reason(ext: Any) -> str:
    """What a REFUSED extension record says, with the fix where the reason is known."""
    words = "".join(c if c.isprintable() else "?"      # a peer's words: no log forging
                    for c in ext.body.rstrip(b"\0").decode(errors="replace"))
    fix = REFUSAL_FIX.get(ext.features)
    return f"{words} ({fix})" if fix else words


Message = tuple[int, bytes, int, bytes, int]
# where a message's type is, and a TAG message's type as it is there
_TYPE_AT = CLIENT_MSG.offset("type")
_TAG_TYPE = TAG.to_bytes(2, "big")


def parse_client_messages(buf: bytearray, most: int | None = None) -> list[Message]:
    """Consume whole 14-byte messages from ``buf`` (at most ``most``): (type, client_ip,
    client_port, target_ip, target_port) each. A partial message stays in ``buf``."""
    n = len(buf) // CLIENT_MSG_SIZE
    if most is not None:
        n = min(n, most)
    out: list[Message] = []
    unpack_from = _CLIENT_MSG.unpack_from
    for i in range(n):
        client_ip, client_port, kind, target_ip, target_port = unpack_from(
            buf, i * CLIENT_MSG_SIZE)
        out.append((kind, client_ip, client_port, target_ip, target_port))
    del buf[:n * CLIENT_MSG_SIZE]
    return out


def open_messages(buf: bytearray, tags: auth.Tagger) -> list[Message]:
    """Consume the batches of ``buf`` whose TAG message arrived and checks, and give their
    messages; what follows the last tag stays in ``buf``. Raises ProtocolError on a wrong
    tag, or on more than UNTAGGED_UP_MAX bytes without one (the caller drops the link)."""
    out: list[Message] = []
    start = 0
    end = len(buf) - len(buf) % CLIENT_MSG_SIZE
    for pos in range(0, end, CLIENT_MSG_SIZE):
        if buf[pos + _TYPE_AT:pos + _TYPE_AT + 2] != _TAG_TYPE:
            continue
        batch = buf[start:pos]
        tag = buf[pos:pos + _TYPE_AT] + buf[pos + _TYPE_AT + 2:pos + CLIENT_MSG_SIZE]
        if not tags.check(batch, bytes(tag[:auth.TAG_SIZE])):
            raise TagError("a batch of messages with a wrong tag (changed on the way, "
                                "or not from the tcpcopyd that proved the secret)")
        out += parse_client_messages(batch)
        start = pos + CLIENT_MSG_SIZE
    del buf[:start]
    if len(buf) > UNTAGGED_UP_MAX:
        raise ProtocolError(f"{len(buf)} bytes of messages without a tag")
    return out


# the most bytes of a packet its reply header is read from: the longest IPv4 header, then
# the TCP part of a reply header
HEADER_SPAN: Final = 60 + REPLY_TCP_SIZE


def reply_header(ip_packet: bytes | bytearray | memoryview) -> bytes:
    """The reply header of an IPv4/TCP packet seen by interceptd (64 bytes), or of an
    IPv6/TCP one (REPLY6_SIZE).

    IPv4 options, if any, are removed (IHL set to 5, total length reduced to match) so the
    receiver finds the TCP header at offset 20 and the payload length stays right; so are
    IPv6 extension headers (the TCP header at offset 40). Raises ProtocolError for
    anything that is not a whole IPv4/TCP or IPv6/TCP header whose lengths agree (the
    caller counts it and skips the packet).
    """
    if isinstance(ip_packet, bytes):
        return _reply_header(ip_packet)
    # (a header is read from the first 60 + 44 bytes at most; an IPv6 one may be longer)
    if len(ip_packet) and ip_packet[0] >> 4 == 6:
        return _reply_header(bytes(ip_packet))
    return _reply_header(bytes(ip_packet[:HEADER_SPAN]))


def _reply_header(ip_packet: bytes) -> bytes:
    """``reply_header`` of bytes (the compiled code indexes and slices them directly)."""
    n = len(ip_packet)
    if n and ip_packet[0] >> 4 == 6:
        return _reply_header6(ip_packet, n)
    if n < P.HEADERS:
        raise ProtocolError(f"{n}-byte packet is too short for IPv4+TCP")
    if not P.is_tcp_ipv4(ip_packet):
        raise ProtocolError("not TCP over IPv4")
    ihl = P.ip_header_length(ip_packet)
    tot = P.total_length(ip_packet)
    if ihl < 20 or n < ihl + P.TCP.size:
        raise ProtocolError(f"bad IP header length {ihl}")
    doff = P.tcp_header_length(ip_packet, ihl)
    if doff < 20 or tot < ihl + doff:
        raise ProtocolError(f"total length {tot} shorter than the headers ({ihl}+{doff})")
    if ihl == 20:
        head = ip_packet[:20]
    else:
        cut = bytearray(ip_packet[:20])
        cut[0] = 0x45
        cut[P.IP_TOTAL_LENGTH:P.IP_TOTAL_LENGTH + 2] = (tot - (ihl - 20)).to_bytes(2, "big")
        head = bytes(cut)
    return head + _tcp_part(ip_packet, ihl)


def _tcp_part(ip_packet: bytes, at: int) -> bytes:
    """The TCP part of a reply header: REPLY_TCP_SIZE bytes from ``at``, zero-padded."""
    tcp = ip_packet[at:at + REPLY_TCP_SIZE]
    if len(tcp) < REPLY_TCP_SIZE:
        tcp += bytes(REPLY_TCP_SIZE - len(tcp))
    return tcp


def _reply_header6(ip_packet: bytes, n: int) -> bytes:
    at = P.tcp_offset6(ip_packet, n)
    if at < 0:
        raise ProtocolError("not TCP over IPv6, or its TCP header cannot be reached")
    plen = int.from_bytes(ip_packet[P.IP6_PAYLOAD_LENGTH:P.IP6_PAYLOAD_LENGTH + 2], "big")
    doff = P.tcp_header_length(ip_packet, at)
    if doff < 20 or plen < at - P.IP6_HEADER + doff:
        raise ProtocolError(f"payload length {plen} shorter than the headers "
                            f"({at - P.IP6_HEADER}+{doff})")
    if at == P.IP6_HEADER:
        head = ip_packet[:P.IP6_HEADER]
    else:
        cut = bytearray(ip_packet[:P.IP6_HEADER])
        cut[P.IP6_PAYLOAD_LENGTH:P.IP6_PAYLOAD_LENGTH + 2] = \
            (plen - (at - P.IP6_HEADER)).to_bytes(2, "big")
        cut[P.IP6_NEXT_HEADER] = P.IPPROTO_TCP
        head = bytes(cut)
    return head + _tcp_part(ip_packet, at)


def payload_prefix(ip_packet: bytes | memoryview, prefix: int) -> bytes:
    """The first ``prefix`` bytes of the TCP payload of a packet ``reply_header`` took."""
    n = len(ip_packet)
    if n and ip_packet[0] >> 4 == 6:
        at = P.tcp_offset6(ip_packet, n)
        total = P.IP6_HEADER + int.from_bytes(
            ip_packet[P.IP6_PAYLOAD_LENGTH:P.IP6_PAYLOAD_LENGTH + 2], "big")
    else:
        at = P.ip_header_length(ip_packet)
        total = P.total_length(ip_packet)
    start = at + P.tcp_header_length(ip_packet, at)
    end = min(n, total, start + prefix)
    return bytes(ip_packet[start:end]) if end > start else b""


def reply_record(ip_packet: bytes | memoryview, prefix: int) -> bytes:
    """The reply header of a packet, followed by the first ``prefix`` bytes of its TCP
    payload (none if it has none)."""
    header = reply_header(ip_packet)
    return header + payload_prefix(ip_packet, prefix) if prefix > 0 else header


def is_v6(record: bytes) -> bool:
    """Whether a reply record is an IPv6 one (its header REPLY6_SIZE bytes; an IPv4
    one begins 0x45)."""
    return len(record) >= REPLY6_SIZE and record[0] >> 4 == 6


def combine(records: list[bytes], payload: bool = False) -> bytes:
    """Frame reply records: headers in combined frames of at most MAX_COMBINED each; a
    record with payload bytes (after its 64-byte header) as a payload frame if ``payload``
    (the peer asked for them), else as its header alone; an IPv6 record as an IPv6 frame
    (with its payload bytes if ``payload``). The order is kept."""
    out = bytearray()
    run: list[bytes] = []
    for r in records:
        if is_v6(r):
            _combined(out, run)
            run = []
            if not payload:
                r = r[:REPLY6_SIZE]
            out += V6_HEAD.pack(V6_MARK, len(r) - REPLY6_SIZE) + r
        elif len(r) > REPLY_SIZE and payload:
            _combined(out, run)
            run = []
            out += PAYLOAD_HEAD.pack(PAYLOAD_MARK, len(r) - REPLY_SIZE) + r
        else:
            run.append(r[:REPLY_SIZE])
    _combined(out, run)
    return bytes(out)


def _combined(out: bytearray, headers: list[bytes]) -> None:
    for i in range(0, len(headers), MAX_COMBINED):
        chunk = headers[i:i + MAX_COMBINED]
        out += COMBINED_HEAD.pack(len(chunk))
        for h in chunk:
            out += h


def split_combined(buf: bytearray, extensions: list[tuple] | None = None,
                   tags: auth.Tagger | None = None) -> list[bytes]:
    """Consume whole combined frames from ``buf``; returns the reply headers. If
    ``extensions`` is given (the caller offered extensions), payload frames and IPv6
    frames are taken and extension frames appended to it as EXT tuples; else all three
    are a protocol error.

    With ``tags`` (a link whose handshake proved the secret) the headers of a batch are
    given only once its tag frame arrived and checks, what follows the last tag stays in
    ``buf``, and an extension frame is a protocol error.

    Raises ProtocolError on a count of 0 or above MAX_COMBINED, a wrong tag, or more than
    UNTAGGED_DOWN_MAX bytes without a tag (the stream cannot be trusted or resynchronised
    after that: the caller must drop the connection).
    """
    out: list[bytes] = []
    held = out if tags is None else []
    exts = extensions if tags is None else None
    pos = taken = 0
    n = len(buf)
    while n - pos >= 2:
        if tags is not None and _U16.unpack_from(buf, pos)[0] == TAG_MARK:
            if n - pos < TAG_FRAME_SIZE:
                break
            if not tags.check(buf[taken:pos], bytes(buf[pos + 2:pos + TAG_FRAME_SIZE])):
                raise TagError("reply frames with a wrong tag (changed on the way, or "
                                    "not from the interceptd that proved the secret)")
            out += held
            held = []
            pos = taken = pos + TAG_FRAME_SIZE
            continue
        end = _frame(buf, pos, held, exts, extensions is not None)
        if end is None:
            break
        pos = end
    if tags is None:
        taken = pos
    elif pos - taken > UNTAGGED_DOWN_MAX:
        raise ProtocolError(f"{pos - taken} bytes of reply frames without a tag")
    del buf[:taken]
    return out


def _frame(buf: bytearray, pos: int, out: list[bytes], extensions: list[tuple] | None,
           payloads: bool) -> int | None:
    """Read the frame at ``pos``: its headers to ``out``, its extension record to
    ``extensions``; returns where it ends, None if it is not whole yet."""
    n = len(buf)
    count = _U16.unpack_from(buf, pos)[0]
    if count == V6_MARK and payloads:
        if n - pos < V6_HEAD.size:
            return None
        length = _U16.unpack_from(buf, pos + 2)[0]
        if length > PREFIX_MAX:
            raise ProtocolError(f"IPv6 frame of {length} payload bytes, above {PREFIX_MAX}")
        end = pos + V6_HEAD.size + REPLY6_SIZE + length
        if end > n:
            return None
        if buf[pos + V6_HEAD.size] >> 4 != 6:
            raise ProtocolError("an IPv6 frame whose header is not IPv6")
        out.append(bytes(buf[pos + V6_HEAD.size:end]))
        return end
    if count == PAYLOAD_MARK and payloads:
        if n - pos < PAYLOAD_HEAD.size:
            return None
        length = _U16.unpack_from(buf, pos + 2)[0]
        if length > PREFIX_MAX:
            raise ProtocolError(f"payload frame of {length} bytes, above {PREFIX_MAX}")
        end = pos + PAYLOAD_HEAD.size + REPLY_SIZE + length
        if end > n:
            return None
        out.append(bytes(buf[pos + PAYLOAD_HEAD.size:end]))
        return end
    if count == EXT_MARK and extensions is not None:
        end = pos + 2 + REPLY_SIZE
        if end > n:
            return None
        extensions.append(EXT.unpack_from(buf, pos + 2))
        return end
    if count == 0 or count > MAX_COMBINED:
        raise ProtocolError(f"combined frame count {count} outside 1..{MAX_COMBINED}")
    end = pos + 2 + count * REPLY_SIZE
    if end > n:
        return None
    for base in range(pos + 2, end, REPLY_SIZE):
        out.append(bytes(buf[base:base + REPLY_SIZE]))
    return end
