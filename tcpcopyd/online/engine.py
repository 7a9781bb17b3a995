"""The session engine: turns captured client packets and intercepted target replies into
the packets a fake client sends to the target (DESIGN §2).

It does no I/O of its own: a ``sender`` puts packets on the wire, a ``control`` link
registers sessions with interceptd, and the worker loop feeds it packets and clock ticks.
"""
from __future__ import annotations

import heapq
import logging
import zlib
from collections import OrderedDict
from typing import Protocol

from shm.seqlock import TornRead
from tcpcopyd.net.packet import (
    ACK,
    FIN,
    IP_TCP,
    OPT_MSS,
    OPT_TIMESTAMP,
    OPT_WSCALE,
    PSH,
    RST,
    SYN,
    U32,
    build,
    parse_options,
    seq_add,
    seq_diff,
    seq_le,
    seq_lt,
    syn_options,
    timestamp_of,
    timestamp_option,
)
from tcpcopyd.online import counters as C
from tcpcopyd.online.copies import Copies
from tcpcopyd.online.portreuse import PortReuse
from tcpcopyd.online.reorder import OutOfOrder
from tcpcopyd.online.rewrite import Rewrite
from tcpcopyd.online.session import (
    CLIENT_FIN,
    CLIENT_RST,
    ESTABLISHED,
    FAKE,
    RESYNC,
    SYN_SENT,
    TARGET_FIN,
    TIMESTAMPS,
    Session,
    State,
)

log = logging.getLogger("tcpcopyd.engine")

# retransmission timeout bounds and initial value, seconds (RFC 6298)
RTO_MIN = 0.2
RTO_MAX = 30.0
RTO_INITIAL = 1.0
# retransmissions of one segment before the session is given up
MAX_RETRIES = 10
# a session whose FIN the target acknowledged but which never closes its side is ended
# after this long, seconds
CLOSE_LINGER = 5.0
# a capture gap (missed client segment) not filled within this long breaks the session
GAP_TIMEOUT = 5.0
# a session created by a client RST or expiry that cannot drain is reset after this long
DRAIN_TIMEOUT = 10.0
# the client's FIN, and the reset of a session the client ended, wait until the target has
# sent no data for this long (it may still be sending a long answer), seconds
TARGET_BUSY = 1.0
# delayed ACK: target data is acknowledged at once every second segment, else after this
# long, unless a packet of ours carries the ACK sooner (seconds)
ACK_DELAY = 0.02
# what a held segment costs beyond its payload (the Python objects that hold it), bytes:
# counted with the payload against --session-buffer, --total-buffer and -m
SEGMENT_COST = 160
# most segments one session holds out of order (beyond: it is reset, it could not be whole)
MAX_OUT_OF_ORDER = 4096
# above this share of the most it may buffer, a worker opens no new session (the open ones
# have room left to finish)
REFUSE_ABOVE = 0.875
# a session resets an older connection its SYN met at most once in this long, seconds
# (each ACK of that connection would ask for one; forged ones too)
STALE_RESET_EVERY = 0.5
# most due timers one tick handles (the rest in the next round: the loop stays responsive)
TICK_BUDGET = 4096


class Sender(Protocol):
    def send(self, packet: bytearray, dst: bytes) -> bool: ...


class Control(Protocol):
    up: bool

    def register(self, s: Session) -> None: ...

    def carries(self, s: Session) -> bool:
        """Whether ``s`` is registered on a control link that is up now (registrations
        are made again on every link that comes up)."""

    def flush(self, now: float) -> None: ...

    def unregister(self, s: Session) -> None: ...


class Table(Protocol):
    def write(self, slot: int, values: tuple) -> None: ...

    def clear(self, slot: int) -> None: ...

    def read(self, slot: int) -> tuple: ...


def sampled(src: bytes, sport: int, rate: int) -> bool:
    """Whether -r RATE copies the sessions of this client address and port: a hash, the same
    in every worker and after every restart, so a session is copied whole or not at all."""
    return zlib.crc32(src + sport.to_bytes(2, "big")) % 100 < rate


class Engine:
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
        self.gapped: set[Session] = set()  # sessions holding data beyond a gap
        self.ooo_bytes = 0                # of buffered_total, held beyond gaps
        self.sessions: dict[tuple, Session] = {}
        # the sessions by last activity, least recent first: those with nothing in flight
        # (evicted first when the table is full), and the others
        self.idle: OrderedDict[tuple, Session] = OrderedDict()
        self.busy: OrderedDict[tuple, Session] = OrderedDict()
        self.counters = [0] * len(C.NAMES)
        # the comparison test (tcpcopyd.online.compare.Exchanges), told what the first copy of
        # each session sends and receives; None: off
        self.observer = None
        self.timers: list[tuple[float, int, Session]] = []
        self._timer_seq = 0
        self.touched: set[Session] = set()
        self.dirty: set[Session] = set()
        self.new: list[Session] = []     # sessions whose SYN waits for their CLIENT_ADD

    @property
    def copies_of(self) -> dict[tuple, list[Session | None]]:
        """Captured key -> its open copies (-n/-f/-c/-H)."""
        return self.copies.groups if self.copies is not None else {}

    def _start_held(self, now: float) -> None:
        """Sessions held behind the previous session of their client port, which ended."""
        for cap, target, segments in self.reuse.take_released():
            for seq, ack, flags, window, options, payload in segments:
                self._segment(self.sessions.get(cap), cap, 0, target, seq, ack, flags,
                              window, options, payload, now)

    def rate(self, now: float) -> int:
        """Percent of sessions copied now (-r, and while -g ramps up, 1 % more a second)."""
        if self.ramp_from is None:
            return self.sample_rate
        ramp = 1 + int(max(0.0, now - self.ramp_from))
        if ramp >= self.sample_rate:
            self.ramp_from = None
        return min(ramp, self.sample_rate)

    # ------------------------------------------------------------------ capture side
    def on_client_packet(self, buf: bytes | bytearray | memoryview, n: int, now: float) -> None:
        """One IPv4 packet captured from a client (already filtered to our service ports)."""
        cnt = self.counters
        cnt[C.CAPTURED] += 1
        if n < 40:
            cnt[C.MALFORMED] += 1
            return
        (vihl, _tos, tot_len, _id, frag, _ttl, proto, _c, src, dst, sport, dport, seq, ack,
         offflags, window, _tc, _u) = IP_TCP.unpack_from(buf, 0)
        thl = (offflags >> 12) << 2
        if vihl != 0x45 or proto != 6 or frag & 0x3FFF or thl < 20 or 20 + thl > n \
                or tot_len < 20 + thl:
            if vihl >> 4 == 4 and vihl & 0xF > 5 and proto == 6:
                self._client_packet_with_ip_options(buf, n, now)
            else:
                cnt[C.MALFORMED] += 1
            return
        end = tot_len if tot_len <= n else n
        if end > self.mtu:
            cnt[C.OVERSIZE] += 1
        self._client_segment(src, dst, sport, dport, seq, ack, offflags & 0x3F, window,
                             bytes(buf[40:20 + thl]) if thl > 20 else b"",
                             bytes(buf[20 + thl:end]) if end > 20 + thl else b"", now)

    def _client_packet_with_ip_options(self, buf, n: int, now: float) -> None:
        from tcpcopyd.net.packet import MalformedPacket, parse
        try:
            p = parse(buf, n)
        except MalformedPacket:
            self.counters[C.MALFORMED] += 1
            return
        self._client_segment(p.src, p.dst, p.sport, p.dport, p.seq, p.ack, p.flags, p.window,
                             p.options, p.payload, now)

    def _client_segment(self, src: bytes, dst: bytes, sport: int, dport: int, seq: int,
                        ack: int, flags: int, window: int, options: bytes, payload: bytes,
                        now: float) -> None:
        target = self.targets.get(dport) or self.targets.get((dst, dport))
        if target is None:
            self.counters[C.NO_SESSION] += 1
            return
        cap = (src, sport, target[0], target[1])
        copies = self.copies
        if copies is None:
            if self.reuse and cap in self.reuse:
                # the client reused the port; its previous session is still finishing
                held = self.reuse.add(cap, (seq, ack, flags, window, options, payload))
                old = self.sessions.get(cap)
                if old is not None and (held > self.max_session_buffer or
                                        self.buffered_total + self.reuse.bytes > self.max_total):
                    self._reset(old, "sessions_reused")   # no room to wait: go at once
                return
            self._segment(self.sessions.get(cap), cap, 0, target, seq, ack, flags, window,
                          options, payload, now)
            return
        if flags & SYN:
            # the client reused the port: the new copies get ports of their own, the old
            # ones finish what they still have for the target (or end now if nothing)
            for c in copies.reused(cap, seq):
                if not (c.unsent or c.unacked):
                    self._reset(c, "sessions_reused")
        for k in range(copies.n):
            group = copies.group(cap)
            self._segment(group[k] if group else None, cap, k, target, seq, ack, flags,
                          window, options, payload, now)

    def _segment(self, s: Session | None, cap: tuple, copy: int, target: tuple[bytes, int],
                 seq: int, ack: int, flags: int, window: int, options: bytes, payload: bytes,
                 now: float) -> None:
        """One captured segment applied to one copy ``s`` of the captured session ``cap``
        (None: that copy is not open)."""
        if (s is None or flags & SYN) and (self.sample_rate < 100 or self.ramp_from) \
                and not sampled(cap[0], cap[1], self.rate(now)):
            if copy == 0:
                self.counters[C.INDEX["not_sampled"]] += 1
            return
        if flags & SYN:
            if flags & (ACK | RST | FIN):
                self.counters[C.MALFORMED] += 1
                return
            if s is not None:
                if s.isn == seq:
                    return  # the client retransmitted its SYN; ours has its own timer
                if self.copies is None and (s.unsent or s.unacked):
                    # the port is reused while the target has not got all of the previous
                    # session: the new one waits for it (both use this port on the target)
                    self.reuse.hold(cap, now, target,
                                    (seq, ack, flags, window, options, payload))
                    self.counters[C.INDEX["port_reuse_held"]] += 1
                    return
                self._reset(s, "sessions_reused")
            self._open(cap, copy, target, seq, window, options, now, fake=False)
            return
        if s is None:
            if not payload:
                self.counters[C.NO_SESSION] += 1
                return
            if self.only_syn:
                self.counters[C.INDEX["not_from_syn"]] += 1
                return
            s = self._open(cap, copy, target, seq_add(seq, -1), window, options, now,
                           fake=True)
            if s is None:
                return
        elif s.state & RESYNC and payload:
            if seq != s.cap_nxt or s.snd_una != s.snd_nxt or s.snd_nxt != s.cap_nxt:
                # the old worker took data of this session with it (captured but not sent,
                # or sent but not acknowledged): start the target's side afresh at this
                # segment (a fake SYN just before it)
                self._close(s, "sessions_resynced", send_rst=True)
                s = self._open(cap, copy, target, seq_add(seq, -1), window, options, now,
                               fake=True)
                if s is None:
                    return
            else:
                s.state &= ~RESYNC
        s.last_seen = now
        if options:
            ts = timestamp_of(options)
            if ts is not None and seq_lt(s.client_tsval, ts[0]):
                s.client_tsval = ts[0]
        if not s.state & FAKE:
            s.client_win = window
        if flags & RST:
            s.state |= CLIENT_RST
            s.close_at = now + DRAIN_TIMEOUT
            self._schedule(s, s.close_at)
            self.touched.add(s)
            return
        if payload or flags & FIN:
            self._enqueue(s, seq, flags & (FIN | PSH), payload, ack, now)
            self.touched.add(s)

    def _open(self, cap: tuple, copy: int, target: tuple[bytes, int], isn: int,
              window: int, options: bytes, now: float, fake: bool) -> Session | None:
        if self.buffered_total - self.ooo_bytes + self.reuse.bytes \
                >= self.max_total * REFUSE_ABOVE:
            self.counters[C.INDEX["sessions_refused"]] += 1   # room for the open ones
            return None
        key = cap if self.copies is None else self.copies.key_for(cap, self.sessions)
        if key is None:
            self.counters[C.INDEX["sessions_refused"]] += 1   # every port of ours in use
            return None
        if not self.free_slots:
            self._evict_oldest()
        s = Session(key, key[0], key[1], key[2], key[3], self.free_slots.pop(), now)
        if self.copies is not None:
            self.copies.add(s, cap, copy)
        if self.initial_rtt is not None:
            r = self.initial_rtt
            s.srtt, s.rttvar = r, r / 2
            s.rto = min(RTO_MAX, max(RTO_MIN, 3 * r))
        s.isn = s.snd_una = isn
        s.snd_nxt = s.cap_nxt = seq_add(isn, 1)
        opts = parse_options(options) if options else {}
        ts = opts.get(OPT_TIMESTAMP)
        tsval = U32.unpack_from(ts, 0)[0] if ts is not None and len(ts) == 8 else None
        if fake:
            s.state = SYN_SENT | FAKE
            s.client_win = 65535
            s.syn_options = syn_options(self.fake_mss, None, True,
                                        (tsval, 0) if tsval is not None else None)
            s.syn_wscale = False
            self.counters[C.INDEX["sessions_fake"]] += 1
        else:
            s.state = SYN_SENT
            s.client_win = window
            s.syn_options = options
            s.syn_wscale = OPT_WSCALE in opts
            self.counters[C.INDEX["sessions_opened"]] += 1
        s.syn_ts = tsval is not None
        s.client_tsval = tsval or 0
        self.sessions[key] = s
        self.idle[key] = s
        self.control.register(s)
        self.new.append(s)
        s.rtt_seq, s.rtt_time = s.snd_nxt, now
        self._arm(s, now + s.rto)
        self.dirty.add(s)
        return s

    def _send_syn(self, s: Session) -> None:
        # a SYN's window is never scaled: offer the largest unscaled one
        self._emit(build(s.client_ip, s.target_ip, s.client_port, s.target_port, s.isn, 0, SYN,
                         65535, s.syn_options), s)

    def _enqueue(self, s: Session, seq: int, flags: int, payload: bytes, ack: int,
                 now: float) -> None:
        if seq != s.cap_nxt:
            if seq_lt(seq, s.cap_nxt):
                skip = seq_diff(s.cap_nxt, seq)
                if skip >= len(payload) + (1 if flags & FIN else 0) or s.state & CLIENT_FIN:
                    self.counters[C.DUPLICATE] += 1
                    return
                payload, seq = payload[skip:], s.cap_nxt
            else:
                self._hold_out_of_order(s, seq, flags, payload, ack, now)
                return
        if not self._append(s, seq, flags, payload, ack):
            return
        ooo = s.ooo
        while ooo and not s.state & CLIENT_FIN and not s.freed:
            ready = ooo.pop_ready(s.cap_nxt)
            if ready is None:
                break
            oseq, oflags, opay, oack = ready
            self._grow(s, -len(opay) - SEGMENT_COST)
            self.ooo_bytes -= len(opay) + SEGMENT_COST
            skip = seq_diff(s.cap_nxt, oseq)        # it may overlap what we have now
            if skip >= len(opay) + (1 if oflags & FIN else 0):
                self.counters[C.DUPLICATE] += 1
                continue
            self._append(s, s.cap_nxt, oflags, opay[skip:], oack)
        if not s.ooo and not s.freed:
            s.ooo = None
            self.gapped.discard(s)
            s.gap_since = 0.0

    def _hold_out_of_order(self, s: Session, seq: int, flags: int, payload: bytes,
                           ack: int, now: float) -> None:
        """A segment beyond a gap: held until the gap fills (GAP_TIMEOUT at most). One
        further ahead than the session may buffer is dropped (its session cannot be whole
        anyway, and it is more likely forged than real); beyond the limits, the session is
        reset: it could not be whole."""
        if seq_diff(seq, s.cap_nxt) > self.max_session_buffer:
            self.counters[C.INDEX["out_of_window"]] += 1
            return
        if s.ooo is None:
            s.ooo = OutOfOrder(s.cap_nxt, SEGMENT_COST)
            self.gapped.add(s)
        if len(s.ooo) >= MAX_OUT_OF_ORDER:
            self._overflow(s, f"{len(s.ooo)} segments held out of order")
            return
        if not s.ooo.add(seq, flags, payload, ack):
            self.counters[C.DUPLICATE] += 1
            return
        self.counters[C.OUT_OF_ORDER] += 1
        self._grow(s, len(payload) + SEGMENT_COST)
        self.ooo_bytes += len(payload) + SEGMENT_COST
        if not s.gap_since:
            s.gap_since = now
            self._schedule(s, now + GAP_TIMEOUT)
        self._check_limits(s)

    def _grow(self, s: Session, n: int) -> None:
        s.buffered += n
        self.buffered_total += n

    def _check_limits(self, s: Session) -> bool:
        """After ``s`` grew: False (and the session reset, counted) if it holds more than
        --session-buffer. When the worker holds more than its share of -m /
        --total-buffer, the sessions with the most data held beyond a gap pay first (they
        cannot be whole without what they miss, and a forged flood lands there), then
        ``s`` itself."""
        if s.buffered > self.max_session_buffer:
            self._overflow(s, f"{s.buffered} bytes buffered (limit {self.max_session_buffer})")
            return False
        while self.buffered_total + self.reuse.bytes > self.max_total:
            others = [g for g in self.gapped if g is not s]
            if not others:
                self._overflow(s, f"the worker buffers "
                                  f"{self.buffered_total + self.reuse.bytes} bytes (limit "
                                  f"{self.max_total})")
                return False
            victim = max(others, key=lambda g: g.ooo.bytes)
            self._overflow(victim, f"{victim.ooo.bytes} bytes held beyond a gap while the "
                                   f"worker is at its limit ({self.max_total})")
        return True

    def _overflow(self, s: Session, why: str) -> None:
        log.warning("session %s: %s: reset", s.describe(), why)
        self._reset(s, "sessions_overflow")

    def _append(self, s: Session, seq: int, flags: int, payload: bytes, ack: int) -> bool:
        """Queue the next segment of the client's stream; False if that overflowed the
        limits (the session is reset)."""
        # the client acknowledged more of the online server's answer since its last data:
        # this segment starts a new request (or closes after an answer), paced on the target
        prev = s.client_ack
        new_request = prev is not None and seq_lt(prev, ack)
        if payload:
            s.client_ack = ack
        s.unsent.append([seq, flags, payload, new_request])
        n = len(payload)
        self._grow(s, n + SEGMENT_COST)
        s.cap_nxt = seq_add(seq, n + (1 if flags & FIN else 0))
        if flags & FIN:
            s.state |= CLIENT_FIN
        return self._check_limits(s)

    # ------------------------------------------------------------------ reply side
    def on_reply(self, hdr: bytes, now: float) -> None:
        """One 64-byte reply header of the target, from interceptd."""
        cnt = self.counters
        cnt[C.REPLIES] += 1
        try:
            (vihl, _tos, tot_len, _id, _frag, _ttl, proto, _c, src, dst, sport, dport, seq,
             ack, offflags, window, _tc, _u) = IP_TCP.unpack_from(hdr, 0)
        except Exception:
            cnt[C.REPLIES_MALFORMED] += 1
            return
        thl = (offflags >> 12) << 2
        if vihl != 0x45 or proto != 6 or thl < 20:
            cnt[C.REPLIES_MALFORMED] += 1
            return
        s = self.sessions.get((dst, dport, src, sport))
        if s is None:
            cnt[C.REPLIES_NO_SESSION] += 1
            return
        plen = tot_len - 20 - thl
        if plen < 0:
            cnt[C.REPLIES_MALFORMED] += 1
            return
        flags = offflags & 0x3F
        s.last_seen = now
        options = hdr[40:20 + thl] if thl > 20 else b""
        if flags & RST:
            if not self._reset_acceptable(s, seq, ack, flags):
                return
            if not flags & ACK and seq == s.rcv_nxt and s.state & ESTABLISHED \
                    and s.snd_una == seq_add(s.isn, 1) and s.retransmits < MAX_RETRIES:
                # the target refused the ACK of our handshake: the SYN-ACK we answered was
                # an old one (delayed on the way, the target has since made a new one)
                self._restart_handshake(s, now)
                return
            if log.isEnabledFor(logging.DEBUG):
                log.debug("session %s reset by the target (state %s, seq %d, ack %d; "
                          "isn %d snd_una %d snd_nxt %d target_isn %d rcv_nxt %d, age %.3fs)",
                          s.describe(), State(s.state & 0xFF), seq, ack, s.isn, s.snd_una,
                          s.snd_nxt, s.target_isn, s.rcv_nxt, now - s.created)
            self._close(s, "sessions_target_rst", send_rst=False)
            return
        if flags & SYN:
            if flags & ACK:
                self._on_syn_ack(s, seq, ack, window, options, now)
            return
        if not s.state & ESTABLISHED:
            # an ACK without SYN to our SYN comes from an older connection — even one that
            # expects exactly our next byte (a session reopened where its carried record
            # was behind: the target had it all)
            if flags & ACK and s.state & SYN_SENT \
                    and now - s.stale_reset_at >= STALE_RESET_EVERY:
                s.stale_reset_at = now
                self._reset_stale_connection(s, ack)
            return
        if s.state & TIMESTAMPS and options:
            ts = timestamp_of(options)
            if ts is not None:
                s.target_tsval = ts[0]
        if flags & ACK:
            self._on_ack(s, ack, window << s.wscale, plen, now)
            if s.freed:
                return
        if plen:
            end = seq_add(seq, plen)
            if self.observer is not None and s.copy == 0:
                self.observer.target_answer(s.cap or s.key, seq, ack, plen, hdr[64:], now)
            if seq_lt(s.rcv_nxt, end):
                s.rcv_nxt = end
            s.awaiting = False
            s.target_seen = now
            self._ack_later(s, now)
        if flags & FIN:
            fin_end = seq_add(seq, plen + 1)
            if seq_lt(s.rcv_nxt, fin_end):
                s.rcv_nxt = fin_end
            s.state |= TARGET_FIN
            self._ack_later(s, now)
        self.touched.add(s)

    def _reset_acceptable(self, s: Session, seq: int, ack: int, flags: int) -> bool:
        """RFC 5961 §3: a reset ends the session only at exactly the next sequence number
        we expect (before the handshake: only if it acknowledges our SYN). One elsewhere in
        our window gets a challenge ACK (a real target answers it with an exact reset);
        one outside it is dropped. Both are counted: they may be forgeries."""
        if s.state & SYN_SENT:
            if flags & ACK and ack == seq_add(s.isn, 1):
                return True
            self.counters[C.INDEX["resets_out_of_window"]] += 1
            return False
        if seq == s.rcv_nxt:
            return True
        if 0 < seq_diff(seq, s.rcv_nxt) < self._receive_window(s):
            self.counters[C.INDEX["challenge_acks"]] += 1
            self._send_ack(s)
        else:
            self.counters[C.INDEX["resets_out_of_window"]] += 1
        return False

    @staticmethod
    def _receive_window(s: Session) -> int:
        """The window the target sees us offer: the client's, scaled by the shift our SYN
        offered."""
        ws = parse_options(s.syn_options).get(OPT_WSCALE) if s.syn_wscale else None
        return max(65535, s.client_win << (min(ws[0], 14) if ws else 0))

    def _ack_later(self, s: Session, now: float) -> None:
        if s.need_ack:
            s.ack_at = now  # a second segment unacknowledged: at once
        else:
            s.need_ack = True
            s.ack_at = now + ACK_DELAY
            self._schedule(s, s.ack_at)

    def _reset_stale_connection(self, s: Session, ack: int) -> None:
        """Our SYN met an older connection the target still has on this address and port
        (it answers with an ACK of its own, RFC 5961 §4): as RFC 793 says, reset it at the
        sequence number it expects, then send the SYN again. This happens when a reset of
        ours missed its mark: a session reopened after its worker died with data unsent,
        a client port used again while the target kept the old connection."""
        self.counters[C.INDEX["stale_connections_reset"]] += 1
        self._emit(build(s.client_ip, s.target_ip, s.client_port, s.target_port, ack, 0, RST,
                         0), s)
        self._send_syn(s)

    def _restart_handshake(self, s: Session, now: float) -> None:
        self.counters[C.INDEX["handshake_restarts"]] += 1
        s.retransmits += 1
        # what was sent goes back in front of what was not, in order
        s.unsent.extendleft(reversed([[e[0], e[1], e[2], False] for e in s.unacked]))
        s.unacked.clear()
        s.state = (s.state & ~ESTABLISHED) | SYN_SENT
        s.snd_una = s.isn
        s.snd_nxt = seq_add(s.isn, 1)
        s.need_ack = False
        s.rtt_seq = None
        self._send_syn(s)
        self._arm(s, now + max(s.rto, RTO_MIN))
        self.dirty.add(s)

    def _on_syn_ack(self, s: Session, seq: int, ack: int, window: int, options: bytes,
                    now: float) -> None:
        if s.state & ESTABLISHED:
            s.need_ack = True  # our handshake ACK was lost: the target sent its SYN-ACK again
            s.ack_at = now
            self.touched.add(s)
            return
        if ack != seq_add(s.isn, 1):
            return
        opts = parse_options(options) if options else {}
        mss = opts.get(OPT_MSS)
        target_mss = int.from_bytes(mss, "big") if mss is not None and len(mss) == 2 else 536
        ws = opts.get(OPT_WSCALE)
        s.wscale = min(ws[0], 14) if ws and s.syn_wscale else 0
        ts = opts.get(OPT_TIMESTAMP)
        if ts is not None and len(ts) == 8 and s.syn_ts:
            s.state |= TIMESTAMPS
            s.target_tsval = U32.unpack_from(ts, 0)[0]
        s.mss = max(64, min(target_mss, self.mtu - 40 - (12 if s.state & TIMESTAMPS else 0)))
        s.target_isn = seq
        s.rcv_nxt = seq_add(seq, 1)
        s.snd_una = seq_add(s.isn, 1)
        s.wnd = window
        s.state = (s.state & ~SYN_SENT) | ESTABLISHED
        if s.rtt_seq is not None:
            self._rtt_sample(s, now - s.rtt_time)
            s.rtt_seq = None
        s.backoff = 0
        s.rto_at = 0.0
        # the third ACK of the handshake rides on the client's first data if that comes soon
        self._ack_later(s, now)
        self.dirty.add(s)
        self.touched.add(s)

    def _on_ack(self, s: Session, ack: int, wnd: int, plen: int, now: float) -> None:
        if seq_lt(s.snd_una, ack) and seq_le(ack, s.snd_nxt):
            q = s.unacked
            while q:
                e = q[0]
                eseq, eflags, epay = e[0], e[1], e[2]
                n = len(epay)
                end = seq_add(eseq, n + (1 if eflags & FIN else 0))
                if seq_le(end, ack):
                    q.popleft()
                    self._grow(s, -n - SEGMENT_COST)
                    continue
                if seq_lt(eseq, ack):
                    cut = seq_diff(ack, eseq)
                    e[0], e[2] = ack, epay[cut:]
                    self._grow(s, -cut)
                break
            s.snd_una = ack
            if s.awaiting:
                # the target is still taking in the request: the wait for its answer starts
                # over (a long upload is not cut short by --pace-timeout)
                s.pace_at = now + self.pace_timeout
            if s.rtt_seq is not None and seq_le(s.rtt_seq, ack):
                self._rtt_sample(s, now - s.rtt_time)
                s.rtt_seq = None
            s.backoff = 0
            s.dupacks = 0
            if q:
                self._arm(s, now + s.rto)
            else:
                s.rto_at = 0.0
            self.dirty.add(s)
        elif ack == s.snd_una and not plen and s.unacked and wnd == s.wnd:
            s.dupacks += 1
            if s.dupacks == 3:
                self.counters[C.INDEX["fast_retransmits"]] += 1
                self._retransmit_head(s, now)
        s.wnd = wnd

    @staticmethod
    def _rtt_sample(s: Session, r: float) -> None:
        if r < 0:
            return
        if s.srtt == 0.0:
            s.srtt, s.rttvar = r, r / 2
        else:
            s.rttvar = 0.75 * s.rttvar + 0.25 * abs(s.srtt - r)
            s.srtt = 0.875 * s.srtt + 0.125 * r
        s.rto = min(RTO_MAX, max(RTO_MIN, s.srtt + max(0.001, 4 * s.rttvar)))

    # ------------------------------------------------------------------ sending
    def flush(self, now: float) -> None:
        """Send what the packets just processed allow: queued data, ACKs, session ends."""
        if self.reuse.released:
            self._start_held(now)
        if self.new:
            # CLIENT_ADD goes out before the SYN, so interceptd knows where the SYN-ACK goes
            self.control.flush(now)
            for s in self.new:
                if not s.freed:
                    self._send_syn(s)
            self.new.clear()
        touched, self.touched = self.touched, set()
        self.dirty |= touched
        for s in touched:
            if s.freed:
                continue
            self._place(s)
            if s.state & ESTABLISHED:
                self._push(s, now)
            self._check_end(s, now)
            if s.need_ack and not s.freed and now >= s.ack_at:
                self._send_ack(s)

    def _push(self, s: Session, now: float) -> None:
        q = s.unsent
        limit = seq_add(s.snd_una, s.wnd)
        while q:
            e = q[0]
            seq, flags, payload, new_request = e
            if new_request and s.awaiting:
                if now < s.pace_at:
                    self.counters[C.INDEX["paced"]] += 1
                    self._schedule(s, s.pace_at)
                    break
            n = len(payload)
            if not n and flags & FIN:
                if s.state & TARGET_FIN and not s.unacked:
                    break  # only the FIN is left and the target closed too: _check_end resets
                if now - s.target_seen < TARGET_BUSY:
                    # the target is still sending its answer: a half-close now would make
                    # servers (nginx) abort it; the FIN waits until the target goes quiet
                    self._schedule(s, s.target_seen + TARGET_BUSY)
                    break
            if n:
                size = min(n, s.mss)
                room = seq_diff(limit, seq)
                if room < size:
                    if room <= 0 or (s.unacked and room < s.mss):
                        if not s.unacked and not s.rto_at:
                            self._arm(s, now + s.rto)  # persist timer: probe the window
                        break
                    size = room
                if size < n:
                    # cut: the head keeps the first part, the FIN stays on the tail
                    head = [seq, flags & ~FIN, payload[:size], new_request]
                    e[0], e[2], e[3] = seq_add(seq, size), payload[size:], False
                    e = head
                    q.appendleft(e)
                    self._grow(s, SEGMENT_COST)     # one segment more held
                    seq, flags, payload, n = head[0], head[1], head[2], size
            q.popleft()
            self._send_segment(s, seq, flags, payload)
            self.counters[C.BYTES_SENT] += n
            if n and self.observer is not None and s.copy == 0:
                self.observer.target_request(s.cap or s.key, seq, payload, now)
            s.unacked.append([seq, flags, payload, False])
            s.snd_nxt = seq_add(seq, n + (1 if flags & FIN else 0))
            if n:
                s.awaiting = True
                s.pace_at = now + self.pace_timeout
            if s.rtt_seq is None:
                s.rtt_seq, s.rtt_time = s.snd_nxt, now
            if not s.rto_at:
                self._arm(s, now + s.rto)
        self.dirty.add(s)

    def _send_segment(self, s: Session, seq: int, flags: int, payload: bytes) -> None:
        opts = timestamp_option(s.client_tsval, s.target_tsval) if s.state & TIMESTAMPS else b""
        self._emit(build(s.client_ip, s.target_ip, s.client_port, s.target_port, seq, s.rcv_nxt,
                         ACK | flags, s.client_win, opts, payload), s)
        s.need_ack = False

    def _send_ack(self, s: Session) -> None:
        self._send_segment(s, s.snd_nxt, 0, b"")

    def _emit(self, pkt: bytearray, s: Session) -> None:
        """Send one packet toward the target: only while an interceptd holds the session's
        registration, so that the target's answer is caught (fail-closed). A reset (it
        draws no answer) goes in any case, to free the target's connection. A packet held
        back is counted and sent again by the retransmission timer or when a link comes
        up (``on_control_up``)."""
        if not (self.control.carries(s) or pkt[33] & RST):
            self.counters[C.INDEX["held_no_link"]] += 1
            return
        if self.sender.send(pkt, s.target_ip):
            self.counters[C.SENT] += 1
        else:
            self.counters[C.SEND_ERRORS] += 1

    def _retransmit_head(self, s: Session, now: float) -> None:
        s.rtt_seq = None
        s.retransmits += 1
        if s.state & SYN_SENT:
            self._send_syn(s)
        elif s.unacked:
            e = s.unacked[0]
            e[3] = True
            self._send_segment(s, e[0], e[1], e[2])
        elif s.unsent and s.state & ESTABLISHED:
            # zero window: probe with one byte of the next segment
            e = s.unsent[0]
            if e[2]:
                probe = [e[0], 0, e[2][:1], True]
                e[0], e[2] = seq_add(e[0], 1), e[2][1:]
                self._grow(s, SEGMENT_COST)         # one segment more held
                if not e[2] and not e[1] & FIN:
                    s.unsent.popleft()
                    self._grow(s, -SEGMENT_COST)
                s.unacked.append(probe)
                s.snd_nxt = seq_add(probe[0], 1)
                self._send_segment(s, probe[0], 0, probe[2])
            else:
                s.unsent.popleft()
                s.unacked.append(e)
                s.snd_nxt = seq_add(e[0], 1)
                self._send_segment(s, e[0], e[1], b"")
        else:
            return

    def _on_rto(self, s: Session, now: float) -> None:
        if s.backoff >= MAX_RETRIES:
            log.info("session %s: no answer from the target after %d retransmissions",
                     s.describe(), s.backoff)
            self._reset(s, "sessions_gave_up")
            return
        self.counters[C.INDEX["retransmits"]] += 1
        self._retransmit_head(s, now)
        s.backoff += 1
        self._arm(s, now + min(RTO_MAX, s.rto * (2 ** s.backoff)))

    # ------------------------------------------------------------------ ending sessions
    def _check_end(self, s: Session, now: float) -> None:
        st = s.state
        if st & CLIENT_RST:
            if now >= s.close_at:
                self._close(s, "sessions_closed", send_rst=True)
            elif not s.unsent and not s.unacked and not s.ooo:
                if st & TARGET_FIN or now - s.target_seen >= TARGET_BUSY:
                    self._close(s, "sessions_closed", send_rst=True)
                else:
                    # delivered; the target is still answering (a download): let it finish
                    s.close_at = now + TARGET_BUSY
                    self._schedule(s, s.close_at)
            return
        if st & CLIENT_FIN and st & TARGET_FIN and not s.unacked and len(s.unsent) == 1 \
                and not s.unsent[0][2]:
            # both sides are done and only the client's FIN is left: a reset (at the FIN's
            # sequence number) ends the target's connection at once, with one packet less
            self._close(s, "sessions_closed", send_rst=True)
            return
        if st & CLIENT_FIN and s.snd_una == s.cap_nxt and not s.unacked:
            if st & TARGET_FIN:
                self._close(s, "sessions_closed", send_rst=True)
            elif not s.close_at:
                s.close_at = now + CLOSE_LINGER
                self._schedule(s, s.close_at)

    def _close(self, s: Session, reason: str, send_rst: bool) -> None:
        if s.freed:
            return
        if send_rst and s.state & (ESTABLISHED | SYN_SENT):
            seq = s.snd_nxt if s.state & ESTABLISHED else seq_add(s.isn, 1)
            self._emit(build(s.client_ip, s.target_ip, s.client_port, s.target_port, seq,
                             s.rcv_nxt, RST | ACK, 0), s)
        s.freed = True
        if log.isEnabledFor(logging.DEBUG):
            log.debug("session %s ends: %s (state %s)", s.describe(), reason,
                      State(s.state & 0xFF))
        self.counters[C.INDEX[reason]] += 1
        if self.observer is not None and s.copy == 0:
            self.observer.closed(s.cap or s.key)
        del self.sessions[s.key]
        self.idle.pop(s.key, None)
        self.busy.pop(s.key, None)
        if self.reuse:
            self.reuse.ended(s.key)
        if s.cap is not None:
            self.copies.remove(s)
        self.control.unregister(s)
        if s.in_table:
            self.table.clear(s.slot)
        self.free_slots.append(s.slot)
        self.dirty.discard(s)
        self.buffered_total -= s.buffered
        if s.ooo is not None:
            self.ooo_bytes -= s.ooo.bytes
            self.gapped.discard(s)
        s.unsent.clear()
        s.unacked.clear()
        s.ooo = None

    def _reset(self, s: Session, reason: str) -> None:
        self._close(s, reason, send_rst=True)

    def _place(self, s: Session) -> None:
        """``s`` was active: to the back of the idle or the busy line, by whether it has
        data in flight."""
        key = s.key
        if s.unsent or s.unacked or s.ooo or s.awaiting:
            self.idle.pop(key, None)
            line = self.busy
        else:
            self.busy.pop(key, None)
            line = self.idle
        line[key] = s
        line.move_to_end(key)

    def _evict_oldest(self) -> None:
        """The table is full: reset the least recently active session with nothing in
        flight, or, when every session has data in flight, the least recently active one.
        O(1) amortized: a session found in the idle line with data since moves to the busy
        one."""
        idle, busy = self.idle, self.busy
        while idle:
            key, s = next(iter(idle.items()))
            if s.unsent or s.unacked or s.ooo or s.awaiting:
                self._place(s)
                continue
            break
        victim = next(iter((idle or busy).values()))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("session table full: evicting %s", victim.describe())
        self._reset(victim, "sessions_evicted")    # counted: a flood would flood the log

    def close_all(self) -> None:
        """Reset every session toward the target (graceful stop)."""
        for s in list(self.sessions.values()):
            self._close(s, "sessions_closed", send_rst=True)

    # ------------------------------------------------------------------ timers
    def _arm(self, s: Session, when: float) -> None:
        s.rto_at = when
        self._schedule(s, when)

    def _schedule(self, s: Session, when: float) -> None:
        self._timer_seq += 1
        heapq.heappush(self.timers, (when, self._timer_seq, s))

    def next_timer(self) -> float | None:
        return self.timers[0][0] if self.timers else None

    def tick(self, now: float) -> None:
        """Run due timers: retransmissions, paced requests, lingering closes, gaps."""
        timers = self.timers
        due: dict[int, Session] = {}
        while timers and timers[0][0] <= now and len(due) < TICK_BUDGET:
            _, _, s = heapq.heappop(timers)
            if not s.freed:
                due[id(s)] = s
        for s in due.values():
            if s.freed or not (s.unsent or s.gap_since or 0.0 < s.rto_at <= now
                               or (s.need_ack and s.ack_at <= now)
                               or 0.0 < s.close_at <= now):
                # a timer that no longer matters: an RTO an ACK has stopped, a delayed ACK
                # that rode on data
                continue
            if s.rto_at and s.rto_at <= now:
                self._on_rto(s, now)
                if s.freed:
                    continue
            if s.gap_since and now - s.gap_since >= GAP_TIMEOUT:
                log.info("session %s: client segment missing from the capture for %.0fs",
                         s.describe(), now - s.gap_since)
                self._reset(s, "sessions_broken")
                continue
            if s.close_at and now >= s.close_at:
                if now - s.target_seen < TARGET_BUSY:
                    # the target is still answering (a long download): wait while it lasts
                    s.close_at = s.target_seen + TARGET_BUSY
                    self._schedule(s, s.close_at)
                else:
                    self._close(s, "sessions_closed", send_rst=True)
                    continue
            self.touched.add(s)
        self.flush(now)

    def expire_idle(self, now: float, timeout: float | None = None) -> None:
        """Reset the sessions idle for longer than ``timeout`` (default: -t, or -k for a
        session with nothing outstanding: a keep-alive connection between requests)."""
        for cap in self.reuse.overdue(now):
            old = self.sessions.get(cap)
            if old is not None:
                self._reset(old, "sessions_reused")   # released at the next flush
        busy = now - (self.idle_timeout if timeout is None else timeout)
        keepalive = self.keepalive_timeout
        calm = busy if keepalive is None or timeout is not None else now - keepalive
        for s in [s for s in self.sessions.values()
                  if s.last_seen < (calm if not (s.unsent or s.unacked or s.awaiting)
                                    else busy)]:
            self._close(s, "sessions_expired", send_rst=True)

    def sync_table(self) -> None:
        """Write the sessions changed since the last call to their shm slots (one that
        opened and ended in between never reaches the table: a free slot stays clear)."""
        if self.table is not None:
            write = self.table.write
            for s in self.dirty:
                if not s.freed:
                    write(s.slot, s.slot_values())
                    s.in_table = True
        self.dirty.clear()
        self.counters[C.INDEX["sessions_active"]] = len(self.sessions)

    def restore(self, now: float) -> int:
        """Carry on the sessions an earlier worker left in our slots of the shm table."""
        if self.table is None:
            return 0
        free = []
        for slot in self.free_slots:
            try:
                v = self.table.read(slot)
            except TornRead:
                # the previous worker died in the middle of writing this slot: its session
                # is lost (the client's next data opens it again with a fake SYN)
                self.table.clear(slot)
                self.counters[C.INDEX["sessions_torn"]] += 1
                free.append(slot)
                continue
            if not v[0]:
                free.append(slot)
                continue
            s = Session.from_slot(slot, v)
            self.sessions[s.key] = s
            self.idle[s.key] = s
            if s.state & SYN_SENT:
                self._arm(s, now + RTO_INITIAL)
        self.free_slots = free
        n = len(self.sessions)
        self.counters[C.INDEX["sessions_restored"]] += n
        return n

    def on_control_up(self, now: float) -> None:
        """interceptd (re)connected: re-register sessions and resend what is outstanding
        (the registrations go out first, so interceptd knows where the answers go)."""
        for s in self.sessions.values():
            self.control.register(s)
        self.control.flush(now)
        for s in self.sessions.values():
            if s.state & SYN_SENT or s.unacked:
                s.backoff = 0
                self._retransmit_head(s, now)
                self._arm(s, now + s.rto)

