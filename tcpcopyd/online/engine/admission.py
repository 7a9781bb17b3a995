"""Captured client segments into sessions: which are copied (-r, -g, -O), which target they
go to, what opens a session (its SYN, or a fake SYN for one already running), a client
port used again, a session a new worker carried on that lost data (reopened), and the
segment applied to its session."""
from __future__ import annotations

from tcpcopyd.net.packet import (
    ACK,
    FIN,
    OPT_TIMESTAMP,
    OPT_WSCALE,
    PSH,
    RST,
    SYN,
    U32,
    parse_options,
    seq_add,
    seq_lt,
    syn_options,
    timestamp_of,
)
from tcpcopyd.online import counters as C
from tcpcopyd.online.engine.closing import close, evict_oldest
from tcpcopyd.online.engine.state import (
    DRAIN_TIMEOUT,
    REFUSE_ABOVE,
    RTO_MAX,
    RTO_MIN,
    EngineState,
    sampled,
)
from tcpcopyd.online.engine.stream import enqueue
from tcpcopyd.online.session import CLIENT_RST, FAKE, RESYNC, SYN_SENT, Session
from tcpcopyd.online.targets import target_for


def client_segment(e: EngineState, src: bytes, dst: bytes, sport: int, dport: int, seq: int,
                   ack: int, flags: int, window: int, options: bytes, payload: bytes,
                   now: float) -> None:
    """One captured client segment, to every copy of its session; its data, when its
    session is copied, to the observer too."""
    target = target_for(e.targets, dst, dport)
    if target is None:
        e.counters[C.NO_SESSION] += 1
        return
    cap = (src, sport, target[0], target[1])
    copies = e.copies
    if e.pool is not None and _handed_over(e, cap, flags):
        return      # another worker of the pool holds this session
    if copies is None:
        if e.reuse and cap in e.reuse:
            # the client reused the port; its previous session is still finishing
            held = e.reuse.add(cap, (seq, ack, flags, window, options, payload))
            old = e.sessions.get(cap)
            if old is not None and (held > e.max_session_buffer or
                                    e.buffered_total + e.reuse.bytes > e.max_total):
                close(e, old, C.SESSIONS_REUSED)   # no room to wait: go at once
        else:
            segment(e, e.sessions.get(cap), cap, 0, target, seq, ack, flags, window, options,
                    payload, now)
    else:
        if flags & SYN:
            # the client reused the port: the new copies get ports of their own, the old
            # ones finish what they still have for the target (or end now if nothing)
            for c in copies.reused(cap, seq):
                if not (c.unsent or c.unacked):
                    close(e, c, C.SESSIONS_REUSED)
        for k in range(copies.n):
            group = copies.group(cap)
            segment(e, group[k] if group else None, cap, k, target, seq, ack, flags, window,
                    options, payload, now)
    if payload and e.observer is not None:
        _observe(e, cap, seq, ack, payload)


def _observe(e: EngineState, cap: tuple, seq: int, ack: int, payload: bytes) -> None:
    """Client data of a copied session, to the observer (the comparison test)."""
    if e.observer is not None and (
            cap in e.sessions or (e.copies is not None and e.copies.group(cap))):
        e.observer.client_data(cap, seq, ack, payload)


def _handed_over(e: EngineState, cap: tuple, flags: int) -> bool:
    """Whether the captured packet, of a session another worker of the pool holds, went to
    that worker (a SYN opens a session here, whoever held its port before)."""
    if flags & SYN or (cap in e.sessions if e.copies is None else e.copies.group(cap)):
        return False
    pool = e.pool
    return pool is not None and pool.hand_over(cap, e.frame, e.frame_len)


def start_held(e: EngineState, now: float) -> None:
    """Sessions held behind the previous session of their client port, which ended."""
    for cap, target, held in e.reuse.take_released():
        for seq, ack, flags, window, options, payload in held:
            segment(e, e.sessions.get(cap), cap, 0, target, seq, ack, flags, window, options,
                    payload, now)


def segment(e: EngineState, s: Session | None, cap: tuple, copy: int,
            target: tuple[bytes, int], seq: int, ack: int, flags: int, window: int,
            options: bytes, payload: bytes, now: float) -> None:
    """One captured segment applied to one copy ``s`` of the captured session ``cap``
    (None: that copy is not open)."""
    if (s is None or flags & SYN) and (e.sample_rate < 100 or e.ramp_from) \
            and not sampled(cap[0], cap[1], e.rate(now)):
        if copy == 0:
            e.counters[C.NOT_SAMPLED] += 1
        return
    if flags & SYN:
        _on_syn(e, s, cap, copy, target, seq, ack, flags, window, options, payload, now)
        return
    if s is None or (s.state & RESYNC and payload):
        s = _session_for(e, s, cap, copy, target, seq, window, options, payload, now)
        if s is None:
            return
    _apply(e, s, seq, ack, flags, window, options, payload, now)


def _on_syn(e: EngineState, s: Session | None, cap: tuple, copy: int,
            target: tuple[bytes, int], seq: int, ack: int, flags: int, window: int,
            options: bytes, payload: bytes, now: float) -> None:
    if flags & (ACK | RST | FIN):
        e.counters[C.MALFORMED] += 1
        return
    if s is not None:
        if s.isn == seq:
            return  # the client retransmitted its SYN; ours has its own timer
        if e.copies is None and (s.unsent or s.unacked):
            # the port is reused while the target has not got all of the previous session:
            # the new one waits for it (both use this port on the target)
            e.reuse.hold(cap, now, target, (seq, ack, flags, window, options, payload))
            e.counters[C.PORT_REUSE_HELD] += 1
            return
        close(e, s, C.SESSIONS_REUSED)
    open_session(e, cap, copy, target, seq, window, options, now, fake=False)


def _session_for(e: EngineState, s: Session | None, cap: tuple, copy: int,
                 target: tuple[bytes, int], seq: int, window: int, options: bytes,
                 payload: bytes, now: float) -> Session | None:
    """The session a segment other than a SYN goes to: ``s``, or one opened with a fake SYN
    for a session whose SYN we did not see, or whose carried record lost data."""
    if s is None:
        if not payload:
            e.counters[C.NO_SESSION] += 1
            return None
        if e.only_syn:
            e.counters[C.NOT_FROM_SYN] += 1
            return None
        return open_session(e, cap, copy, target, seq_add(seq, -1), window, options, now,
                            fake=True)
    if s.state & RESYNC and payload:
        if seq != s.cap_nxt or s.snd_una != s.snd_nxt or s.snd_nxt != s.cap_nxt:
            # the old worker took data of this session with it (captured but not sent, or
            # sent but not acknowledged): start the target's side afresh at this segment
            # (a fake SYN just before it)
            close(e, s, C.SESSIONS_RESYNCED)
            return open_session(e, cap, copy, target, seq_add(seq, -1), window, options,
                                now, fake=True)
        s.state &= ~RESYNC
    return s


def _apply(e: EngineState, s: Session, seq: int, ack: int, flags: int, window: int,
           options: bytes, payload: bytes, now: float) -> None:
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
        e.schedule(s, s.close_at)
        e.touched[s] = None
        return
    if payload or flags & FIN:
        enqueue(e, s, seq, flags & (FIN | PSH), payload, ack, now)
        e.touched[s] = None


def open_session(e: EngineState, cap: tuple, copy: int, target: tuple[bytes, int], isn: int,
                 window: int, options: bytes, now: float, fake: bool) -> Session | None:
    """A new session toward the target, its SYN (or fake SYN) sent at the next flush, once
    its registration is out; None if the worker may not open one now (counted)."""
    if e.buffered_total - e.ooo_bytes + e.reuse.bytes >= e.max_total * REFUSE_ABOVE:
        e.counters[C.SESSIONS_REFUSED] += 1   # room for the open ones
        return None
    key = cap if e.copies is None else e.copies.key_for(cap, e.sessions)
    if key is None:
        e.counters[C.SESSIONS_REFUSED] += 1   # every port of ours in use
        return None
    if not e.free_slots:
        evict_oldest(e)
    s = Session(key, key[0], key[1], key[2], key[3], e.free_slots.pop(), now)
    if e.copies is not None:
        e.copies.add(s, cap, copy)
    if e.initial_rtt is not None:
        r = e.initial_rtt
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
        s.syn_options = syn_options(e.fake_mss, None, True,
                                    (tsval, 0) if tsval is not None else None)
        s.syn_wscale = False
        e.counters[C.SESSIONS_FAKE] += 1
    else:
        s.state = SYN_SENT
        s.client_win = window
        s.syn_options = options
        s.syn_wscale = OPT_WSCALE in opts
        e.counters[C.SESSIONS_OPENED] += 1
    s.syn_ts = tsval is not None
    s.client_tsval = tsval or 0
    if len(key[0]) == 16:
        e.counters[C.SESSIONS_IPV6] += 1
    e.sessions[key] = s
    e.idle[key] = s
    if e.observer is not None and copy == 0:
        e.observer.opened(cap)
    if e.pool is not None and copy == 0:
        e.pool.publish(cap)
    e.control.register(s)
    e.new.append(s)
    s.rtt_seq, s.rtt_time = s.snd_nxt, now
    e.arm(s, now + s.rto)
    e.dirty.add(s)
    return s
