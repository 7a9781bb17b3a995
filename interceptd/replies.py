"""What interceptd sends tcpcopyd of each packet of the target: its reply record."""
from __future__ import annotations

from collections.abc import Callable
from typing import Final

from interceptd import counters as C
from interceptd.router import Router
from tcpcopyd.net import packet as P
from tcpcopyd.net import wire

# the sessions whose last answer's ack is remembered (to find each answer's first segment)
ANSWERS_SEEN_MAX: Final = 65536
MALFORMED: Final = C.INDEX["malformed"]
QUEUED_IPV6: Final = C.INDEX["queued_ipv6"]


class Recorder:
    """Turns a packet of the target into its reply record: its 64-byte header, and for
    the first data segment of an answer (its ack is new: the client's request moved it)
    the first bytes of its payload, while a comparison test wants them."""

    def __init__(self) -> None:
        # some tcpcopyd asked for the answers' first bytes (a comparison test is on)
        self.want_prefix = False
        self.last_ack: dict[bytes, bytes] = {}

    def record(self, packet: bytes | memoryview) -> bytes:
        """Raises ProtocolError for a packet that is not a whole IPv4/TCP or IPv6/TCP
        header."""
        header = wire.reply_header(packet)
        if not self.want_prefix:
            return header
        if header[0] >> 4 == 6:
            tcp = P.IP6_HEADER
            data = P.U16.unpack_from(header, P.IP6_PAYLOAD_LENGTH)[0] \
                > P.tcp_header_length(header, tcp)
        else:
            tcp = 20
            data = P.total_length(header) > 20 + P.tcp_header_length(header)
        if not data:
            return header
        key = P.destination(header)
        ack = header[tcp + P.TCP_ACK:tcp + P.TCP_ACK + 4]
        if self.last_ack.get(key) == ack:
            return header
        if len(self.last_ack) >= ANSWERS_SEEN_MAX:
            self.last_ack.clear()
        self.last_ack[key] = ack
        return header + wire.payload_prefix(packet, wire.PREFIX_MAX)


class ReplyPath:
    """A packet of the target to its record and its route. A packet that is not a whole
    IPv4/TCP or IPv6/TCP header is counted and skipped; nothing a packet holds stops the worker:
    anything else that goes wrong with one is counted the same and given to
    ``on_error`` (which logs it)."""

    def __init__(self, recorder: Recorder, router: Router, counters: list[int],
                 on_error: Callable[[bytes], None]) -> None:
        self.recorder = recorder
        self.router = router
        self.counters = counters
        self.on_error = on_error

    def handle(self, packet: bytes, now: float) -> None:
        try:
            if len(packet) and packet[0] >> 4 == 6:
                self.counters[QUEUED_IPV6] += 1
            self.router.route(self.recorder.record(packet), now)
        except wire.ProtocolError:
            self.counters[MALFORMED] += 1
        except Exception:
            self.counters[MALFORMED] += 1
            self.on_error(packet)
