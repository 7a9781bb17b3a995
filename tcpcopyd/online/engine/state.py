"""What the engine's parts share: its limits, the interfaces it is given (a sender, a control
link, the shm table, an observer), and ``EngineState``, every session of one worker and what
they hold in all. The parts (admission, stream, replies, transmit, closing, output,
persist) are functions over it; ``Engine`` (core) adds the entry points the worker calls.
"""
from __future__ import annotations

import zlib
from collections import OrderedDict
from typing import Final, Protocol

from tcpcopyd.online import counters as C
from tcpcopyd.online.copies import Copies
from tcpcopyd.online.portreuse import PortReuse
from tcpcopyd.online.rewrite import Rewrite
from tcpcopyd.online.session import Session
from tcpcopyd.online.timers import Timers

# retransmission timeout bounds and initial value, seconds (RFC 6298)
RTO_MIN: Final = 0.2
RTO_MAX: Final = 30.0
RTO_INITIAL: Final = 1.0
# retransmissions of one segment before the session is given up
MAX_RETRIES: Final = 10
# a session whose FIN the target acknowledged but which never closes its side is ended
# after this long, seconds
CLOSE_LINGER: Final = 5.0
# a capture gap (missed client segment) not filled within this long breaks the session
GAP_TIMEOUT: Final = 5.0
# a session created by a client RST or expiry that cannot drain is reset after this long
DRAIN_TIMEOUT: Final = 10.0
# the client's FIN, and the reset of a session the client ended, wait until the target has
# sent no data for this long (it may still be sending a long answer), seconds
TARGET_BUSY: Final = 1.0
# delayed ACK: target data is acknowledged at once every second segment, else after this
# long, unless a packet of ours carries the ACK sooner (seconds)
ACK_DELAY: Final = 0.02
# what a held segment costs beyond its payload (the Python objects that hold it), bytes:
# counted with the payload against --session-buffer, --total-buffer and -m
SEGMENT_COST: Final = 160
# most segments one session holds out of order (beyond: it is reset, it could not be whole)
MAX_OUT_OF_ORDER: Final = 4096
# above this share of the most it may buffer, a worker opens no new session (the open ones
# have room left to finish)
REFUSE_ABOVE: Final = 0.875
# a session resets an older connection its SYN met at most once in this long, seconds
# (each ACK of that connection would ask for one; forged ones too)
STALE_RESET_EVERY: Final = 0.5
# most due timers one tick handles (the rest in the next round: the loop stays responsive)
TICK_BUDGET: Final = 4096


class Sender(Protocol):
    """Puts a packet on the wire toward ``dst`` (False: the send failed)."""

    def send(self, packet: bytearray, dst: bytes) -> bool: ...


class Control(Protocol):
    """The control links to interceptd: where sessions are registered."""

    up: bool

    def register(self, s: Session) -> None: ...

    def carries(self, s: Session) -> bool:
        """Whether ``s`` is registered on a control link that is up now (registrations
        are made again on every link that comes up)."""

    def flush(self, now: float) -> None: ...

    def unregister(self, s: Session) -> None: ...


class Table(Protocol):
    """The shm session table: one slot per session, written by this worker only."""

    def write(self, slot: int, values: tuple) -> None: ...

    def clear(self, slot: int) -> None: ...

    def read(self, slot: int) -> tuple: ...


class Observer(Protocol):
    """Told of the first copy of each session: that it opened, what the client sent on it,
    what it sent to and received from the target, that it closed (the comparison test,
    tcpcopyd.online.compare.Exchanges). ``key``: the captured session (client ip, client
    port, target ip, target port)."""

    def opened(self, key: tuple) -> None: ...

    def client_data(self, key: tuple, seq: int, ack: int, payload: bytes) -> None:
        """Data the client sent (captured), acknowledging ``ack`` of the online answer."""

    def target_request(self, key: tuple, seq: int, payload: bytes, now: float) -> None: ...

    def target_answer(self, key: tuple, seq: int, ack: int, nbytes: int, prefix: bytes,
                      now: float) -> None: ...

    def closed(self, key: tuple) -> None: ...


class Pool(Protocol):
    """The other workers of a pool that grows and shrinks (workers = auto,
    tcpcopyd.online.strays): this worker's sessions published for them to find, and the
    captured packets of theirs handed to them."""

    def publish(self, key: tuple) -> None:
        """A session of this worker opened: ``key`` is its captured session."""

    def withdraw(self, key: tuple) -> None: ...

    def hand_over(self, key: tuple, frame: bytes | bytearray | memoryview, n: int) -> bool:
        """The captured packet ``frame[:n]`` of ``key``, which this worker does not hold, to
        the worker that does; False: none does (or it is a packet handed to us)."""


def sampled(src: bytes, sport: int, rate: int) -> bool:
    """Whether -r RATE copies the sessions of this client address and port: a hash, the same
    in every worker and after every restart, so a session is copied whole or not at all."""
    return zlib.crc32(src + sport.to_bytes(2, "big")) % 100 < rate


class EngineState:
    """The sessions of one worker, the limits they live under, what they hold in all, and
    the timers that are due for them."""

    def __init__(self, targets: dict, sender: Sender, control: Control,
                 table: Table | None, slots: range, *, mtu: int = 1500, fake_mss: int = 1460,
                 idle_timeout: float = 120.0, pace_timeout: float = 2.0,
                 max_session_buffer: int = 64 << 20, max_total_buffer: int = 512 << 20,
                 sample_rate: int = 100, keepalive_timeout: float | None = None,
                 only_syn: bool = False, initial_rtt: float | None = None,
                 max_memory: int | None = None, rewrite: Rewrite | None = None,
                 ramp_from: float | None = None) -> None:
        # local service port, or (online ip, port) for rules bound to one address
        #   -> (target ip, target port)
        self.targets = targets
        self.sender = sender
        self.control = control
        self.table = table
        self.free_slots = list(reversed(slots))
        self.mtu = mtu
        self.fake_mss = fake_mss
        self.idle_timeout = idle_timeout
        self.pace_timeout = pace_timeout
        self.max_session_buffer = max_session_buffer
        self.max_total_buffer = max_total_buffer
        self.sample_rate = sample_rate    # percent of sessions copied (-r)
        # idle limit of a session with nothing outstanding (-k); None: idle_timeout
        self.keepalive_timeout = keepalive_timeout
        self.only_syn = only_syn          # -O: no session without its SYN
        self.initial_rtt = initial_rtt    # -R: RTT assumed before the first measurement
        self.max_memory = max_memory      # -m (this worker's share): new sessions refused
        # most bytes buffered in all: -m's share, and never above --total-buffer
        self.max_total = max_total_buffer if max_memory is None \
            else min(max_total_buffer, max_memory)
        # -n/-f/-c/-H: the copies of each captured session; None: one, seen as the client
        self.copies = Copies(rewrite) if rewrite is not None else None
        self.ramp_from = ramp_from        # -g: the copied share grows from 1 % at this time
        # new sessions waiting for the previous session of their client port to end
        self.reuse = PortReuse(SEGMENT_COST)
        self.buffered_total = 0           # bytes buffered over all sessions
        # sessions holding data beyond a gap; a dict, not a set: kept in arrival order, so
        # the same packets make the same choices in every build (a set's order is by address)
        self.gapped: dict[Session, None] = {}
        self.ooo_bytes = 0                # of buffered_total, held beyond gaps
        self.sessions: dict[tuple, Session] = {}
        # the sessions by last activity, least recent first: those with nothing in flight
        # (evicted first when the table is full), and the others
        self.idle: OrderedDict[tuple, Session] = OrderedDict()
        self.busy: OrderedDict[tuple, Session] = OrderedDict()
        self.counters = [0] * len(C.NAMES)
        # the comparison test, told what the first copy of each session sends and
        # receives; None: off
        self.observer: Observer | None = None
        self.timers: Timers[Session] = Timers()    # wake-ups of sessions
        self.touched: dict[Session, None] = {}   # sessions the packets just moved, in order
        self.dirty: set[Session] = set()     # sessions whose shm slot is behind
        self.new: list[Session] = []     # sessions whose SYN waits for their CLIENT_ADD
        # sessions whose outstanding packets go again once their registration is out (a
        # control link came up)
        self.resend: list[Session] = []
        # the other workers of a pool (workers = auto) while there are any; None: alone
        self.pool: Pool | None = None
        # the captured packet being handled (what a pool hands to another worker)
        self.frame: bytes | bytearray | memoryview = b""
        self.frame_len = 0

    def rate(self, now: float) -> int:
        """Percent of sessions copied now (-r, and while -g ramps up, 1 % more a second)."""
        if self.ramp_from is None:
            return self.sample_rate
        ramp = 1 + int(max(0.0, now - self.ramp_from))
        if ramp >= self.sample_rate:
            self.ramp_from = None
        return min(ramp, self.sample_rate)

    def grow(self, s: Session, n: int) -> None:
        """``s`` holds ``n`` bytes more (fewer, if negative)."""
        s.buffered += n
        self.buffered_total += n

    def arm(self, s: Session, when: float) -> None:
        """Set the retransmission timer of ``s``."""
        s.rto_at = when
        self.schedule(s, when)

    def schedule(self, s: Session, when: float) -> None:
        """Look at ``s`` again at ``when`` (tick: whatever is due for it then)."""
        self.timers.add(when, s)

    def next_timer(self) -> float | None:
        return self.timers.next()
