"""Sending the client's stream to the target: within its window and MSS, a new request
paced until the target answered the previous one, the FIN held while the target still
answers; retransmission on timeout (RFC 6298 backoff) and after three duplicate ACKs, the
zero-window probe."""
from __future__ import annotations

import logging

from tcpcopyd.net.packet import FIN, seq_add, seq_diff
from tcpcopyd.online import counters as C
from tcpcopyd.online.engine.closing import close
from tcpcopyd.online.engine.output import send_segment, send_syn
from tcpcopyd.online.engine.state import (
    MAX_RETRIES,
    RTO_MAX,
    SEGMENT_COST,
    TARGET_BUSY,
    EngineState,
)
from tcpcopyd.online.session import ESTABLISHED, SYN_SENT, TARGET_FIN, Queued, Session

log = logging.getLogger("tcpcopyd.engine")


def push(e: EngineState, s: Session, now: float) -> None:
    """Send what of ``s``'s unsent data the target's window, pacing and the FIN rule allow."""
    q = s.unsent
    limit = seq_add(s.snd_una, s.wnd)
    while q:
        piece = q[0]
        payload = piece.payload
        if ((piece.new_request and s.awaiting) or (not payload and piece.flags & FIN)) \
                and _waits(e, s, piece, now):
            break
        n = len(payload)
        if n and (n > s.mss or seq_diff(limit, piece.seq) < n):
            head = _fitting(e, s, piece, limit, now)
            if head is None:
                break
            if head is piece:
                q.popleft()
        else:       # the whole piece fits (the common case)
            q.popleft()
            head = piece
        # sent for the first time: it waits in unacked for the target's ACK
        seq, payload = head.seq, head.payload
        n = len(payload)
        send_segment(e, s, seq, head.flags, payload)
        e.counters[C.BYTES_SENT] += n
        if n and e.observer is not None and s.copy == 0:
            e.observer.target_request(s.cap or s.key, seq, payload, now)
        head.new_request = False
        s.unacked.append(head)
        s.snd_nxt = seq_add(seq, n + (1 if head.flags & FIN else 0))
        if n:
            s.awaiting = True
            s.pace_at = now + e.pace_timeout
        if s.rtt_seq is None:
            s.rtt_seq, s.rtt_time = s.snd_nxt, now
        if not s.rto_at:
            e.arm(s, now + s.rto)
    e.dirty.add(s)


def _waits(e: EngineState, s: Session, piece: Queued, now: float) -> bool:
    """Whether the next piece waits: a new request while the target has not answered the
    previous one (until --pace-timeout), or the bare FIN while the target still answers."""
    if piece.new_request and s.awaiting and now < s.pace_at:
        e.counters[C.PACED] += 1
        e.schedule(s, s.pace_at)
        return True
    if not piece.payload and piece.flags & FIN:
        if s.state & TARGET_FIN and not s.unacked:
            return True  # only the FIN is left and the target closed too: check_end resets
        if now - s.target_seen < TARGET_BUSY:
            # the target is still sending its answer: a half-close now would make servers
            # (nginx) abort it; the FIN waits until the target goes quiet
            e.schedule(s, s.target_seen + TARGET_BUSY)
            return True
    return False


def _fitting(e: EngineState, s: Session, piece: Queued, limit: int,
             now: float) -> Queued | None:
    """What of ``piece`` may go now: itself, its head (cut off, the rest stays queued), or
    None when the window has no room (the persist timer then probes it)."""
    n = len(piece.payload)
    size = min(n, s.mss)
    room = seq_diff(limit, piece.seq)
    if room < size:
        if room <= 0 or (s.unacked and room < s.mss):
            if not s.unacked and not s.rto_at:
                e.arm(s, now + s.rto)  # persist timer: probe the window
            return None
        size = room
    if size == n:
        return piece
    # cut: the head goes with the first part, the FIN stays on the tail
    head = Queued(piece.seq, piece.flags & ~FIN, piece.payload[:size], piece.new_request)
    piece.seq, piece.payload, piece.new_request = seq_add(piece.seq, size), \
        piece.payload[size:], False
    e.grow(s, SEGMENT_COST)     # one segment more held
    return head


def retransmit_head(e: EngineState, s: Session) -> None:
    """Send again the oldest of what the target has not acknowledged (the SYN before the
    handshake), or probe a zero window with one byte of the next piece."""
    s.rtt_seq = None
    s.retransmits += 1
    if s.state & SYN_SENT:
        send_syn(e, s)
    elif s.unacked:
        head = s.unacked[0]
        send_segment(e, s, head.seq, head.flags, head.payload)
    elif s.unsent and s.state & ESTABLISHED:
        _probe(e, s)


def _probe(e: EngineState, s: Session) -> None:
    """Zero window: one byte of the next piece (or the bare FIN) goes out to probe it."""
    nxt = s.unsent[0]
    if nxt.payload:
        probe = Queued(nxt.seq, 0, nxt.payload[:1])
        nxt.seq, nxt.payload = seq_add(nxt.seq, 1), nxt.payload[1:]
        e.grow(s, SEGMENT_COST)         # one segment more held
        if not nxt.payload and not nxt.flags & FIN:
            s.unsent.popleft()
            e.grow(s, -SEGMENT_COST)
        s.unacked.append(probe)
        s.snd_nxt = seq_add(probe.seq, 1)
        send_segment(e, s, probe.seq, 0, probe.payload)
    else:
        s.unsent.popleft()
        s.unacked.append(nxt)
        s.snd_nxt = seq_add(nxt.seq, 1)
        send_segment(e, s, nxt.seq, nxt.flags, b"")


def on_rto(e: EngineState, s: Session, now: float) -> None:
    """The retransmission timer of ``s`` ran out: send again with backoff, or give up."""
    if s.backoff >= MAX_RETRIES:
        log.info("session %s: no answer from the target after %d retransmissions",
                 s.describe(), s.backoff)
        close(e, s, C.SESSIONS_GAVE_UP)
        return
    e.counters[C.RETRANSMITS] += 1
    retransmit_head(e, s)
    s.recover = s.snd_nxt       # what the partial ACKs to come send again (RFC 6582)
    s.backoff += 1
    e.arm(s, now + min(RTO_MAX, s.rto * (2 ** s.backoff)))
