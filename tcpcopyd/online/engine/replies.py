"""The target's side of a session, from the reply headers interceptd forwards: the
handshake (and its restart when the target refused our ACK of an old SYN-ACK), its ACKs
(what it has, its window, RTT samples, duplicate ACKs), its data and FIN (acknowledged,
delayed by up to ACK_DELAY), and its resets (RFC 5961: only an exact one ends a session)."""
from __future__ import annotations

import logging

from tcpcopyd.net.packet import (
    ACK,
    FIN,
    OPT_MSS,
    OPT_SACK,
    OPT_TIMESTAMP,
    OPT_WSCALE,
    RST,
    SYN,
    U32,
    parse_options,
    seq_add,
    seq_diff,
    seq_le,
    seq_lt,
    timestamp_of,
)
from tcpcopyd.online import counters as C
from tcpcopyd.online.engine.closing import close
from tcpcopyd.online.engine.output import send_ack, send_reset, send_syn
from tcpcopyd.online.engine.state import (
    ACK_DELAY,
    MAX_RETRIES,
    RTO_MAX,
    RTO_MIN,
    SEGMENT_COST,
    STALE_RESET_EVERY,
    EngineState,
)
from tcpcopyd.online.engine.transmit import retransmit_head
from tcpcopyd.online.session import (
    ESTABLISHED,
    SYN_SENT,
    TARGET_FIN,
    TIMESTAMPS,
    Queued,
    Session,
    State,
)

log = logging.getLogger("tcpcopyd.engine")


def on_segment(e: EngineState, s: Session, seq: int, ack: int, flags: int, window: int,
               plen: int, options: bytes, prefix: bytes, now: float) -> None:
    """One segment of the target to ``s`` (its header; ``prefix``: the first bytes of its
    payload when interceptd sends them, for the comparison test)."""
    s.last_seen = now
    if flags & RST:
        _on_reset(e, s, seq, ack, flags, now)
        return
    if flags & SYN:
        if flags & ACK:
            _on_syn_ack(e, s, seq, ack, window, options, now)
        return
    if not s.state & ESTABLISHED:
        _before_handshake(e, s, flags, ack, now)
        return
    if s.state & TIMESTAMPS and options:
        ts = timestamp_of(options)
        if ts is not None:
            s.target_tsval = ts[0]
    if flags & ACK:
        _on_ack(e, s, ack, window << s.wscale, plen, options, now)
        if s.freed:
            return
    if plen:
        _on_data(e, s, seq, ack, plen, prefix, now)
    if flags & FIN:
        fin_end = seq_add(seq, plen + 1)
        if seq_lt(s.rcv_nxt, fin_end):
            s.rcv_nxt = fin_end
        s.state |= TARGET_FIN
        _ack_later(e, s, now)
    e.touched[s] = None


def _on_data(e: EngineState, s: Session, seq: int, ack: int, plen: int, prefix: bytes,
             now: float) -> None:
    end = seq_add(seq, plen)
    if e.observer is not None and s.copy == 0:
        e.observer.target_answer(s.cap or s.key, seq, ack, plen, prefix, now)
    if seq_lt(s.rcv_nxt, end):
        s.rcv_nxt = end
    s.awaiting = False
    s.target_seen = now
    _ack_later(e, s, now)


def _on_reset(e: EngineState, s: Session, seq: int, ack: int, flags: int, now: float) -> None:
    if not _reset_acceptable(e, s, seq, ack, flags):
        return
    if not flags & ACK and seq == s.rcv_nxt and s.state & ESTABLISHED \
            and s.snd_una == seq_add(s.isn, 1) and s.retransmits < MAX_RETRIES:
        # the target refused the ACK of our handshake: the SYN-ACK we answered was an old
        # one (delayed on the way, the target has since made a new one)
        _restart_handshake(e, s, now)
        return
    if log.isEnabledFor(logging.DEBUG):
        log.debug("session %s reset by the target (state %s, seq %d, ack %d; isn %d snd_una "
                  "%d snd_nxt %d target_isn %d rcv_nxt %d, age %.3fs)", s.describe(),
                  State(s.state & 0xFF), seq, ack, s.isn, s.snd_una, s.snd_nxt, s.target_isn,
                  s.rcv_nxt, now - s.created)
    close(e, s, C.SESSIONS_TARGET_RST, send_rst=False)


def _before_handshake(e: EngineState, s: Session, flags: int, ack: int, now: float) -> None:
    """An ACK without SYN to our SYN comes from an older connection — even one that expects
    exactly our next byte (a session reopened where its carried record was behind: the
    target had it all)."""
    if flags & ACK and s.state & SYN_SENT and now - s.stale_reset_at >= STALE_RESET_EVERY:
        s.stale_reset_at = now
        _reset_stale_connection(e, s, ack)


def _reset_acceptable(e: EngineState, s: Session, seq: int, ack: int, flags: int) -> bool:
    """RFC 5961 §3: a reset ends the session only at exactly the next sequence number we
    expect (before the handshake: only if it acknowledges our SYN). One elsewhere in our
    window gets a challenge ACK (a real target answers it with an exact reset); one outside
    it is dropped. Both are counted: they may be forgeries."""
    if s.state & SYN_SENT:
        if flags & ACK and ack == seq_add(s.isn, 1):
            return True
        e.counters[C.RESETS_OUT_OF_WINDOW] += 1
        return False
    if seq == s.rcv_nxt:
        return True
    if 0 < seq_diff(seq, s.rcv_nxt) < _receive_window(s):
        e.counters[C.CHALLENGE_ACKS] += 1
        send_ack(e, s)
    else:
        e.counters[C.RESETS_OUT_OF_WINDOW] += 1
    return False


def _receive_window(s: Session) -> int:
    """The window the target sees us offer: the client's, scaled by the shift our SYN
    offered."""
    ws = parse_options(s.syn_options).get(OPT_WSCALE) if s.syn_wscale else None
    return max(65535, s.client_win << (min(ws[0], 14) if ws else 0))


def _ack_later(e: EngineState, s: Session, now: float) -> None:
    if s.need_ack:
        s.ack_at = now  # a second segment unacknowledged: at once
    else:
        s.need_ack = True
        s.ack_at = now + ACK_DELAY
        e.schedule(s, s.ack_at)


def _reset_stale_connection(e: EngineState, s: Session, ack: int) -> None:
    """Our SYN met an older connection the target still has on this address and port (it
    answers with an ACK of its own, RFC 5961 §4): as RFC 793 says, reset it at the sequence
    number it expects, then send the SYN again. This happens when a reset of ours missed
    its mark: a session reopened after its worker died with data unsent, a client port used
    again while the target kept the old connection."""
    e.counters[C.STALE_CONNECTIONS_RESET] += 1
    send_reset(e, s, ack)
    send_syn(e, s)


def _restart_handshake(e: EngineState, s: Session, now: float) -> None:
    e.counters[C.HANDSHAKE_RESTARTS] += 1
    s.retransmits += 1
    # what was sent goes back in front of what was not, in order
    s.unsent.extendleft(reversed([Queued(q.seq, q.flags, q.payload) for q in s.unacked]))
    s.unacked.clear()
    s.state = (s.state & ~ESTABLISHED) | SYN_SENT
    s.snd_una = s.isn
    s.snd_nxt = seq_add(s.isn, 1)
    s.need_ack = False
    s.rtt_seq = None
    send_syn(e, s)
    e.arm(s, now + max(s.rto, RTO_MIN))
    e.dirty.add(s)


def _on_syn_ack(e: EngineState, s: Session, seq: int, ack: int, window: int, options: bytes,
                now: float) -> None:
    if s.state & ESTABLISHED:
        s.need_ack = True  # our handshake ACK was lost: the target sent its SYN-ACK again
        s.ack_at = now
        e.touched[s] = None
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
    # the MTU less the IP and TCP headers (IPv6's is 40 bytes) and the timestamps
    s.mss = max(64, min(target_mss, e.mtu - (40 if len(s.client_ip) == 4 else 60)
                        - (12 if s.state & TIMESTAMPS else 0)))
    s.target_isn = seq
    s.rcv_nxt = seq_add(seq, 1)
    s.snd_una = seq_add(s.isn, 1)
    s.wnd = window
    s.state = (s.state & ~SYN_SENT) | ESTABLISHED
    if s.rtt_seq is not None:
        _rtt_sample(s, now - s.rtt_time)
        s.rtt_seq = None
    s.backoff = 0
    s.rto_at = 0.0
    # the third ACK of the handshake rides on the client's first data if that comes soon
    _ack_later(e, s, now)
    e.dirty.add(s)
    e.touched[s] = None


def _on_ack(e: EngineState, s: Session, ack: int, wnd: int, plen: int, options: bytes,
            now: float) -> None:
    """What the target's ACK says: data it has (a partial ACK in a recovery sends the
    next hole again at once: NewReno, RFC 6582), its window, an RTT sample, a duplicate
    (the third starts a recovery: the oldest segment sent again)."""
    if seq_lt(s.snd_una, ack) and seq_le(ack, s.snd_nxt):
        _acknowledged(e, s, ack)
        s.snd_una = ack
        if s.awaiting:
            # the target is still taking in the request: the wait for its answer starts
            # over (a long upload is not cut short by --pace-timeout)
            s.pace_at = now + e.pace_timeout
        if s.rtt_seq is not None and seq_le(s.rtt_seq, ack):
            _rtt_sample(s, now - s.rtt_time)
            s.rtt_seq = None
        s.backoff = 0
        s.dupacks = 0
        if s.recover >= 0:
            if s.unacked and seq_lt(ack, s.recover):
                e.counters[C.FAST_RETRANSMITS] += 1
                retransmit_head(e, s)
            else:
                s.recover = -1            # all that was out when it began: over
        if s.unacked:
            e.arm(s, now + s.rto)
        else:
            s.rto_at = 0.0
        e.dirty.add(s)
    elif ack == s.snd_una and not plen and s.unacked and (wnd == s.wnd or _sacks(options)):
        # (a duplicate that reports data beyond a hole is one whatever its window: the
        # target's buffer holding that data shrinks it)
        s.dupacks += 1
        if s.dupacks == 3 and s.recover < 0:
            e.counters[C.FAST_RETRANSMITS] += 1
            s.recover = s.snd_nxt
            retransmit_head(e, s)
    s.wnd = wnd


def _sacks(options: bytes) -> bool:
    """Whether a TCP option block carries SACK blocks."""
    return bool(options) and OPT_SACK in parse_options(options)


def _acknowledged(e: EngineState, s: Session, ack: int) -> None:
    """Drop what the target now has from ``unacked`` (a piece it has part of is trimmed)."""
    q = s.unacked
    while q:
        head = q[0]
        n = len(head.payload)
        if seq_le(head.end(), ack):
            q.popleft()
            e.grow(s, -n - SEGMENT_COST)
            continue
        if seq_lt(head.seq, ack):
            cut = seq_diff(ack, head.seq)
            head.seq, head.payload = ack, head.payload[cut:]
            e.grow(s, -cut)
        break


def _rtt_sample(s: Session, r: float) -> None:
    if r < 0:
        return
    if s.srtt == 0.0:
        s.srtt, s.rttvar = r, r / 2
    else:
        s.rttvar = 0.75 * s.rttvar + 0.25 * abs(s.srtt - r)
        s.srtt = 0.875 * s.srtt + 0.125 * r
    s.rto = min(RTO_MAX, max(RTO_MIN, s.srtt + max(0.001, 4 * s.rttvar)))
