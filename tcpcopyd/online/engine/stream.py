"""The client's stream as captured: segments queued in order (``unsent``), duplicates
dropped, segments beyond a gap held until it fills, and the buffer budget every byte held
counts against (--session-buffer, and the worker's share of -m / --total-buffer)."""
from __future__ import annotations

from tcpcopyd.net.packet import FIN, seq_add, seq_diff, seq_lt
from tcpcopyd.online import counters as C
from tcpcopyd.online.engine.closing import overflow
from tcpcopyd.online.engine.state import (
    GAP_TIMEOUT,
    MAX_OUT_OF_ORDER,
    SEGMENT_COST,
    EngineState,
)
from tcpcopyd.online.reorder import OutOfOrder
from tcpcopyd.online.session import CLIENT_FIN, Queued, Session


def enqueue(e: EngineState, s: Session, seq: int, flags: int, payload: bytes, ack: int,
            now: float) -> None:
    """A captured segment of data (or the FIN) of ``s``."""
    if seq != s.cap_nxt:
        if seq_lt(seq, s.cap_nxt):
            skip = seq_diff(s.cap_nxt, seq)
            if skip >= len(payload) + (1 if flags & FIN else 0) or s.state & CLIENT_FIN:
                e.counters[C.DUPLICATE] += 1
                return
            payload, seq = payload[skip:], s.cap_nxt
        else:
            hold_out_of_order(e, s, seq, flags, payload, ack, now)
            return
    answered = flags & FIN and not payload and s.client_ack is not None \
        and seq_lt(s.client_ack, ack)
    if not append(e, s, seq, flags, payload, ack):
        return
    if answered and s.awaiting and e.pace_timeout:
        # the client closes after the online server's answer, which the target has not
        # given yet: it gets the pace timeout from now (as long as the online server
        # took, near enough) before the FIN, which a server may take for an abort of the
        # request it is still serving (nginx: 499)
        s.pace_at = max(s.pace_at, now + e.pace_timeout)
    if s.ooo is not None:
        _take_ready(e, s)


def _take_ready(e: EngineState, s: Session) -> None:
    """Queue the held segments the gap's end has made next."""
    ooo = s.ooo
    while ooo and not s.state & CLIENT_FIN and not s.freed:
        ready = ooo.pop_ready(s.cap_nxt)
        if ready is None:
            break
        oseq, oflags, opay, oack = ready
        e.grow(s, -len(opay) - SEGMENT_COST)
        e.ooo_bytes -= len(opay) + SEGMENT_COST
        skip = seq_diff(s.cap_nxt, oseq)        # it may overlap what we have now
        if skip >= len(opay) + (1 if oflags & FIN else 0):
            e.counters[C.DUPLICATE] += 1
            continue
        append(e, s, s.cap_nxt, oflags, opay[skip:], oack)
    if not s.ooo and not s.freed:
        s.ooo = None
        e.gapped.pop(s, None)
        s.gap_since = 0.0


def hold_out_of_order(e: EngineState, s: Session, seq: int, flags: int, payload: bytes,
                      ack: int, now: float) -> None:
    """A segment beyond a gap: held until the gap fills (GAP_TIMEOUT at most). One further
    ahead than the session may buffer is dropped (its session cannot be whole anyway, and
    it is more likely forged than real); beyond the limits, the session is reset: it could
    not be whole."""
    if seq_diff(seq, s.cap_nxt) > e.max_session_buffer:
        e.counters[C.OUT_OF_WINDOW] += 1
        return
    if s.ooo is None:
        s.ooo = OutOfOrder(s.cap_nxt, SEGMENT_COST)
        e.gapped[s] = None
    if len(s.ooo) >= MAX_OUT_OF_ORDER:
        overflow(e, s, f"{len(s.ooo)} segments held out of order")
        return
    if not s.ooo.add(seq, flags, payload, ack):
        e.counters[C.DUPLICATE] += 1
        return
    e.counters[C.OUT_OF_ORDER] += 1
    e.grow(s, len(payload) + SEGMENT_COST)
    e.ooo_bytes += len(payload) + SEGMENT_COST
    if not s.gap_since:
        s.gap_since = now
        e.counters[C.CAPTURE_GAPS] += 1
        e.schedule(s, now + GAP_TIMEOUT)
    check_limits(e, s)


def check_limits(e: EngineState, s: Session) -> bool:
    """After ``s`` grew: False (and the session reset, counted) if it holds more than
    --session-buffer. When the worker holds more than its share of -m / --total-buffer,
    the sessions with the most data held beyond a gap pay first (they cannot be whole
    without what they miss, and a forged flood lands there), then ``s`` itself."""
    if s.buffered > e.max_session_buffer:
        overflow(e, s, f"{s.buffered} bytes buffered (limit {e.max_session_buffer})")
        return False
    while e.buffered_total + e.reuse.bytes > e.max_total:
        others = [g for g in e.gapped if g is not s]
        if not others:
            overflow(e, s, f"the worker buffers {e.buffered_total + e.reuse.bytes} bytes "
                           f"(limit {e.max_total})")
            return False
        victim = max(others, key=held_beyond_gap)
        overflow(e, victim, f"{held_beyond_gap(victim)} bytes held beyond a gap while the "
                            f"worker is at its limit ({e.max_total})")
    return True


def held_beyond_gap(s: Session) -> int:
    return s.ooo.bytes if s.ooo is not None else 0


def append(e: EngineState, s: Session, seq: int, flags: int, payload: bytes, ack: int) -> bool:
    """Queue the next segment of the client's stream; False if that overflowed the limits
    (the session is reset)."""
    # the client acknowledged more of the online server's answer since its last data:
    # this segment starts a new request (or closes after an answer), paced on the target
    prev = s.client_ack
    new_request = prev is not None and seq_lt(prev, ack)
    if payload:
        s.client_ack = ack
    s.unsent.append(Queued(seq, flags, payload, new_request))
    n = len(payload)
    e.grow(s, n + SEGMENT_COST)
    s.cap_nxt = seq_add(seq, n + (1 if flags & FIN else 0))
    if flags & FIN:
        s.state |= CLIENT_FIN
    return check_limits(e, s)
