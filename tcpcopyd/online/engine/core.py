"""The session engine: turns captured client packets and intercepted target replies into
the packets a fake client sends to the target. It does no I/O of its own: a ``sender``
puts packets on the wire, a ``control`` link registers sessions with interceptd, and the
worker loop feeds it packets and clock ticks.

``Engine`` holds the entry points the worker calls; the work is done by the parts
(admission, stream, replies, transmit, closing, output, persist), functions over the
state they share (``EngineState``).
"""
from __future__ import annotations

import logging

from tcpcopyd.net import wire
from tcpcopyd.net.packet import (
    HEADERS,
    HEADERS6,
    IP6_HEADER,
    IP6_SRC,
    IP6_TCP,
    IP_TCP,
    NOT_TCP,
    TCP_HDR,
    MalformedPacket,
    parse,
    tcp_offset6,
)
from tcpcopyd.online import counters as C
from tcpcopyd.online.engine import persist
from tcpcopyd.online.engine.admission import client_segment, start_held
from tcpcopyd.online.engine.closing import check_end, close, place
from tcpcopyd.online.engine.output import send_ack, send_syn
from tcpcopyd.online.engine.replies import on_segment
from tcpcopyd.online.engine.state import GAP_TIMEOUT, TARGET_BUSY, TICK_BUDGET, EngineState
from tcpcopyd.online.engine.transmit import on_rto, push, retransmit_head
from tcpcopyd.online.session import ESTABLISHED, SYN_SENT, Session

log = logging.getLogger("tcpcopyd.engine")


class Engine(EngineState):
    """One worker's fake clients: what the worker loop calls, packet by packet and tick by
    tick."""

    @property
    def copies_of(self) -> dict[tuple, list[Session | None]]:
        """Captured key -> its open copies (-n/-f/-c/-H)."""
        return self.copies.groups if self.copies is not None else {}

    # ------------------------------------------------------------------ capture side
    def on_client_packet(self, buf: bytes | bytearray | memoryview, n: int, now: float) -> None:
        """One IPv4 or IPv6 packet captured from a client (already filtered to our service
        ports)."""
        cnt = self.counters
        cnt[C.CAPTURED] += 1
        self.frame = buf
        self.frame_len = n
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
            elif vihl >> 4 == 6:
                self._client_packet6(buf, n, now)
            else:
                cnt[C.MALFORMED] += 1
            return
        end = tot_len if tot_len <= n else n
        if end > self.mtu:
            cnt[C.OVERSIZE] += 1
        client_segment(self, src, dst, sport, dport, seq, ack, offflags & 0x3F, window,
                       bytes(buf[HEADERS:20 + thl]) if thl > 20 else b"",
                       bytes(buf[20 + thl:end]) if end > 20 + thl else b"", now)

    def _client_packet6(self, buf: bytes | bytearray | memoryview, n: int, now: float) -> None:
        """An IPv6 packet: its TCP header found behind the extension headers (none, as a
        rule); one whose TCP header cannot be reached is counted and skipped."""
        cnt = self.counters
        at = tcp_offset6(buf, n)
        if at < 0:
            cnt[C.MALFORMED if at == NOT_TCP else C.NOT_FOLLOWED] += 1
            return
        if at == IP6_HEADER:
            (_vcf, plen, _nh, _hl, src, dst, sport, dport, seq, ack, offflags, window, _tc,
             _u) = IP6_TCP.unpack_from(buf, 0)
        else:
            plen = buf[4] << 8 | buf[5]
            src = bytes(buf[IP6_SRC:IP6_SRC + 16])
            dst = bytes(buf[IP6_SRC + 16:IP6_SRC + 32])
            sport, dport, seq, ack, offflags, window, _tc, _u = TCP_HDR.unpack_from(buf, at)
        thl = (offflags >> 12) << 2
        # a payload length of 0: a jumbogram, or a GRO frame beyond 64 KiB (BIG TCP)
        end = n if not plen or IP6_HEADER + plen > n else IP6_HEADER + plen
        if thl < 20 or at + thl > end:
            cnt[C.MALFORMED] += 1
            return
        if end > self.mtu:
            cnt[C.OVERSIZE] += 1
        client_segment(self, src, dst, sport, dport, seq, ack, offflags & 0x3F, window,
                       bytes(buf[at + 20:at + thl]) if thl > 20 else b"",
                       bytes(buf[at + thl:end]) if end > at + thl else b"", now)

    def _client_packet_with_ip_options(self, buf, n: int, now: float) -> None:
        try:
            p = parse(buf, n)
        except MalformedPacket:
            self.counters[C.MALFORMED] += 1
            return
        client_segment(self, p.src, p.dst, p.sport, p.dport, p.seq, p.ack, p.flags, p.window,
                       p.options, p.payload, now)

    # ------------------------------------------------------------------ reply side
    def on_reply(self, hdr: bytes, now: float) -> None:
        """One reply record of the target, from interceptd: its 64-byte IPv4 reply header
        or its 84-byte IPv6 one, then the first bytes of its payload, if any."""
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
            if vihl >> 4 == 6:
                self._reply6(hdr, now)
            else:
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
        on_segment(self, s, seq, ack, offflags & 0x3F, window, plen,
                   # (a reply header keeps 44 bytes of TCP header: no payload byte in it)
                   hdr[HEADERS:min(20 + thl, wire.REPLY_SIZE)] if thl > 20 else b"",
                   hdr[wire.REPLY_SIZE:], now)

    def _reply6(self, hdr: bytes, now: float) -> None:
        cnt = self.counters
        if len(hdr) < wire.REPLY6_SIZE:
            cnt[C.REPLIES_MALFORMED] += 1
            return
        (_vcf, plen, nh, _hl, src, dst, sport, dport, seq, ack, offflags, window, _tc,
         _u) = IP6_TCP.unpack_from(hdr, 0)
        thl = (offflags >> 12) << 2
        if nh != 6 or thl < 20 or plen < thl:
            cnt[C.REPLIES_MALFORMED] += 1
            return
        s = self.sessions.get((dst, dport, src, sport))
        if s is None:
            cnt[C.REPLIES_NO_SESSION] += 1
            return
        on_segment(self, s, seq, ack, offflags & 0x3F, window, plen - thl,
                   hdr[HEADERS6:min(IP6_HEADER + thl, wire.REPLY6_SIZE)] if thl > 20 else b"",
                   hdr[wire.REPLY6_SIZE:], now)

    # ------------------------------------------------------------------ sending
    def flush(self, now: float) -> None:
        """Send what the packets just processed allow. The one place control messages
        leave, and first: a session's registration reaches interceptd before any packet
        of it (interceptd must know where the SYN-ACK goes), and the registrations a link
        that came up takes again before what is sent again on it. Then the SYNs of new
        sessions, what is sent again, queued data, ACKs, session ends. What this work
        queues for the control links (the CLIENT_DEL of a session that ended) leaves with
        the next flush: the next turn of the loop."""
        if self.reuse.released:
            start_held(self, now)      # may open sessions: their registrations go now
        self.control.flush(now)
        if self.new:
            for s in self.new:
                if not s.freed:
                    send_syn(self, s)
            self.new.clear()
        if self.resend:
            for s in self.resend:
                if not s.freed:
                    s.backoff = 0
                    retransmit_head(self, s)
                    self.arm(s, now + s.rto)
            self.resend.clear()
        touched, self.touched = self.touched, {}
        self.dirty.update(touched)
        for s in touched:
            if s.freed:
                continue
            place(self, s)
            if s.state & ESTABLISHED:
                push(self, s, now)
            check_end(self, s, now)
            if s.need_ack and not s.freed and now >= s.ack_at:
                send_ack(self, s)

    # ------------------------------------------------------------------ timers
    def tick(self, now: float) -> None:
        """Run due timers: retransmissions, paced requests, lingering closes, gaps."""
        due: dict[int, Session] = {}
        for s in self.timers.due(now, TICK_BUDGET):
            if not s.freed:
                due[id(s)] = s
        for s in due.values():
            # skip a timer that no longer matters: an RTO an ACK has stopped, a delayed ACK
            # that rode on data
            if not s.freed and (s.unsent or s.gap_since or 0.0 < s.rto_at <= now
                                or (s.need_ack and s.ack_at <= now) or 0.0 < s.close_at <= now):
                self._due(s, now)
        self.flush(now)

    def _due(self, s: Session, now: float) -> None:
        """What is due for ``s`` now: a retransmission, the end of a gap's wait or of a
        lingering close; then it is looked at by the next flush."""
        if s.rto_at and s.rto_at <= now:
            on_rto(self, s, now)
            if s.freed:
                return
        if s.gap_since and now - s.gap_since >= GAP_TIMEOUT:
            log.info("session %s: client segment missing from the capture for %.0fs",
                     s.describe(), now - s.gap_since)
            close(self, s, C.SESSIONS_BROKEN)
            return
        if s.close_at and now >= s.close_at:
            if now - s.target_seen < TARGET_BUSY:
                # the target is still answering (a long download): wait while it lasts
                s.close_at = s.target_seen + TARGET_BUSY
                self.schedule(s, s.close_at)
            else:
                close(self, s, C.SESSIONS_CLOSED)
                return
        self.touched[s] = None

    def expire_idle(self, now: float, timeout: float | None = None) -> None:
        """Reset the sessions idle for longer than ``timeout`` (default: -t, or -k for a
        session with nothing outstanding: a keep-alive connection between requests)."""
        for cap in self.reuse.overdue(now):
            old = self.sessions.get(cap)
            if old is not None:
                close(self, old, C.SESSIONS_REUSED)   # released at the next flush
        busy = now - (self.idle_timeout if timeout is None else timeout)
        keepalive = self.keepalive_timeout
        calm = busy if keepalive is None or timeout is not None else now - keepalive
        for s in [s for s in self.sessions.values()
                  if s.last_seen < (calm if not (s.unsent or s.unacked or s.awaiting)
                                    else busy)]:
            close(self, s, C.SESSIONS_EXPIRED)

    def close_all(self) -> None:
        """Reset every session toward the target (graceful stop)."""
        for s in list(self.sessions.values()):
            close(self, s, C.SESSIONS_CLOSED)

    # ------------------------------------------------------------------ shm, links
    def sync_table(self) -> None:
        persist.sync_table(self)

    def restore(self, now: float) -> int:
        return persist.restore(self, now)

    def on_control_up(self, now: float) -> None:
        """interceptd (re)connected: re-register sessions and resend what is outstanding
        at once (``flush`` sends the registrations first, so interceptd knows where the
        answers go)."""
        for s in self.sessions.values():
            self.control.register(s)
            if s.state & SYN_SENT or s.unacked:
                self.resend.append(s)
        self.flush(now)
