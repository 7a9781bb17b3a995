"""One replicated TCP session: the fake client's view of its connection to the target.

Sequence numbers are the client's own (kept unchanged toward the target); ``rcv_nxt`` is in
the target's sequence space (learned from intercepted replies) and is what we acknowledge.
"""
from __future__ import annotations

import enum
from collections import deque
from typing import Any, Final

from shm.record import Record
from tcpcopyd.net.packet import FIN, endpoint
from tcpcopyd.online.reorder import OutOfOrder


class State(enum.IntFlag):
    """Where a session stands: flags, several at once."""
    SYN_SENT = 1       # SYN (or fake SYN) sent, waiting for the target's SYN-ACK
    ESTABLISHED = 2    # handshake with the target completed
    CLIENT_FIN = 4     # the client closed: its FIN is queued after its data
    CLIENT_RST = 8     # the client reset: deliver what is queued, then reset the target
    TARGET_FIN = 16    # the target closed its side
    FAKE = 32          # opened with a fake SYN (the real SYN was never captured)
    TIMESTAMPS = 64    # TCP timestamps negotiated with the target
    RESYNC = 128       # restored from shm by a new worker: buffers were lost with the old one


# plain ints of the same values, for the packet path
SYN_SENT: Final = int(State.SYN_SENT)
ESTABLISHED: Final = int(State.ESTABLISHED)
CLIENT_FIN: Final = int(State.CLIENT_FIN)
CLIENT_RST: Final = int(State.CLIENT_RST)
TARGET_FIN: Final = int(State.TARGET_FIN)
FAKE: Final = int(State.FAKE)
TIMESTAMPS: Final = int(State.TIMESTAMPS)
RESYNC: Final = int(State.RESYNC)

# shm slot record of a session (after the seqlock counter): everything a new worker needs
# to carry the session on. Numbers little-endian; addresses network-order bytes.
SLOT: Final = Record("Slot", (
    ("state", "H"),          # State flags; 0: a free slot
    ("client_win", "H"),     # the client's window field, sent as is
    ("client_ip", "16s"),    # the address and port the target sees (IPv4: 4 bytes, then 0)
    ("client_port", "H"),
    ("target_port", "H"),
    ("target_ip", "16s"),
    ("isn", "I"),            # client sequence space: ISN, oldest unacknowledged, next to
    ("snd_una", "I"),        #   send, next expected from the capture
    ("snd_nxt", "I"),
    ("cap_nxt", "I"),
    ("target_isn", "I"),     # target sequence space: its ISN, what we acknowledge
    ("rcv_nxt", "I"),
    ("wnd", "I"),            # the target's window in bytes (scaled)
    ("mss", "H"),
    ("wscale", "B"),
    ("syn_flags", "B"),      # 1: our SYN offered window scaling, 2: timestamps; 4: IPv6
    ("client_tsval", "I"),
    ("target_tsval", "I"),
    ("created", "d"),        # monotonic clock
    ("last_seen", "d"),
    ("retransmits", "I"),
    ("buffered", "I"),       # bytes held (lost if the worker dies)
    ("syn_optlen", "B"),     # options of the (fake) SYN, for retransmission
    ("syn_options", "40s"),
))
SLOT_SIZE: Final = 160


class Queued:
    """One piece of the client's stream on its way to the target: in ``unsent`` (captured,
    not sent yet) or in ``unacked`` (sent, not acknowledged yet). Mutable: a piece is cut
    when the target's window or MSS takes only part of it, and trimmed when the target
    acknowledges part of it."""

    __slots__ = ("seq", "flags", "payload", "new_request")

    def __init__(self, seq: int, flags: int, payload: bytes, new_request: bool = False) -> None:
        self.seq = seq
        self.flags = flags                # FIN and PSH as captured (ACK is always added)
        self.payload = payload
        # the client had acknowledged more of the online answer: it starts a new request,
        # which waits (pacing) until the target has answered the one before
        self.new_request = new_request

    def end(self) -> int:
        """The sequence number after it (a FIN counts one)."""
        return (self.seq + len(self.payload) + (1 if self.flags & FIN else 0)) & 0xFFFFFFFF


class Session:
    """One replicated session: the fake client's state of its connection to the target."""

    __slots__ = (
        "key", "client_ip", "client_port", "target_ip", "target_port", "slot", "state",
        "isn", "snd_una", "snd_nxt", "cap_nxt", "unsent", "unacked", "ooo", "buffered",
        "target_isn", "rcv_nxt", "wnd", "wscale", "mss", "syn_options", "syn_wscale",
        "syn_ts", "client_tsval", "target_tsval", "client_win", "client_ack", "awaiting",
        "pace_at", "need_ack", "ack_at", "rto", "srtt", "rttvar", "rto_at", "backoff", "rtt_seq",
        "rtt_time", "dupacks", "created", "last_seen", "target_seen", "close_at", "gap_since",
        "retransmits", "freed", "cap", "copy", "stale_reset_at", "in_table", "flow",
        "recover",
    )

    def __init__(self, key: tuple, client_ip: bytes, client_port: int, target_ip: bytes,
                 target_port: int, slot: int, now: float) -> None:
        self.key = key
        self.cap: tuple | None = None   # the captured session, when the target sees another
        self.copy = 0                   # which copy of it (-n)
        self.client_ip = client_ip
        self.client_port = client_port
        self.target_ip = target_ip
        self.target_port = target_port
        self.slot = slot
        self.state = 0
        self.isn = 0              # client ISN (sequence number of the SYN)
        self.snd_una = 0          # oldest client byte the target has not acknowledged
        self.snd_nxt = 0          # next client sequence number to send to the target
        self.cap_nxt = 0          # next client sequence number expected from the capture
        self.unsent: deque[Queued] = deque()    # captured, not sent yet
        self.unacked: deque[Queued] = deque()   # sent, not acknowledged yet
        self.ooo: OutOfOrder | None = None   # client segments ahead of a gap
        self.buffered = 0         # bytes held in unsent + unacked + ooo (payload + overhead)
        self.target_isn = 0
        self.rcv_nxt = 0          # target's next sequence number: what we acknowledge
        self.wnd = 65535          # target's advertised window, in bytes
        self.wscale = 0           # shift applied to the target's window field
        self.mss = 536            # largest payload per segment toward the target
        self.syn_options = b""    # options of the (fake) SYN, for retransmission
        self.syn_wscale = False   # our SYN offered window scaling
        self.syn_ts = False       # our SYN offered timestamps
        self.client_tsval = 0     # newest TSval seen from the client (used on every send)
        self.target_tsval = 0     # newest TSval seen from the target (echoed as TSecr)
        self.client_win = 65535   # client's window field, sent as is
        self.client_ack: int | None = None  # ack field of the client's last data segment
        self.awaiting = False     # a request went out; the target has not answered yet
        self.pace_at = 0.0        # when a held request is sent even without an answer
        self.need_ack = False     # target data or FIN to acknowledge
        self.ack_at = 0.0         # when that acknowledgement is due (delayed ACK)
        self.rto = 1.0
        self.srtt = 0.0
        self.rttvar = 0.0
        self.rto_at = 0.0         # retransmission deadline (0: not armed)
        self.backoff = 0
        self.rtt_seq: int | None = None   # ack that ends the segment being timed
        self.rtt_time = 0.0
        self.dupacks = 0
        self.recover = -1         # in a loss recovery: snd_nxt when it began (-1: none)
        self.created = now
        self.last_seen = now
        self.target_seen = 0.0    # when the target last sent us data
        self.close_at = 0.0       # when a session waiting for the target's FIN is ended
        self.gap_since = 0.0      # when the capture first missed a client segment
        self.retransmits = 0
        self.freed = False
        self.in_table = False     # its shm slot holds it (written once at least)
        self.stale_reset_at = 0.0  # when we last reset an older connection of the target
        # the IPv6 flow label of its packets: one per connection, as a client's stack
        # draws it (RFC 6437), derived from the connection so that a new worker keeps it
        self.flow = flow_label(client_ip, client_port, target_port)

    def slot_values(self) -> tuple:
        return (self.state, self.client_win, self.client_ip, self.client_port,
                self.target_port, self.target_ip, self.isn, self.snd_una, self.snd_nxt,
                self.cap_nxt, self.target_isn, self.rcv_nxt, min(self.wnd, 0xFFFFFFFF),
                self.mss, self.wscale,
                self.syn_wscale | (self.syn_ts << 1) | (4 if len(self.client_ip) == 16 else 0),
                self.client_tsval,
                self.target_tsval, self.created, self.last_seen, self.retransmits,
                self.buffered & 0xFFFFFFFF, len(self.syn_options), self.syn_options)

    @classmethod
    def from_slot(cls, slot: int, v: Any) -> Session:
        """A session carried on by a new worker from its shm record (a ``SLOT`` tuple).
        Data that the old worker held (not yet sent, or sent and not yet acknowledged) is
        gone: the session is marked RESYNC."""
        size = 16 if v.syn_flags & 4 else 4
        client_ip, target_ip = v.client_ip[:size], v.target_ip[:size]
        s = cls((client_ip, v.client_port, target_ip, v.target_port), client_ip,
                v.client_port, target_ip, v.target_port, slot, v.created)
        s.state = v.state | RESYNC
        s.in_table = True
        s.client_win = v.client_win
        s.isn, s.snd_una, s.snd_nxt, s.cap_nxt = v.isn, v.snd_una, v.snd_nxt, v.cap_nxt
        s.target_isn, s.rcv_nxt, s.wnd = v.target_isn, v.rcv_nxt, v.wnd
        s.mss, s.wscale = v.mss, v.wscale
        s.syn_wscale, s.syn_ts = bool(v.syn_flags & 1), bool(v.syn_flags & 2)
        s.client_tsval, s.target_tsval = v.client_tsval, v.target_tsval
        s.last_seen, s.retransmits = v.last_seen, v.retransmits
        s.syn_options = v.syn_options[:v.syn_optlen]
        return s

    def describe(self) -> str:
        return (f"{endpoint(self.client_ip, self.client_port)} -> "
                f"{endpoint(self.target_ip, self.target_port)}")


def flow_label(client_ip: bytes, client_port: int, target_port: int) -> int:
    """A non-zero 20-bit flow label for an IPv6 connection (0 for IPv4: none)."""
    if len(client_ip) == 4:
        return 0
    h = (int.from_bytes(client_ip[8:], "big") ^ (client_port << 16 | target_port)) \
        * 0x9E3779B1
    return (h >> 12) & 0xFFFFF or 1
