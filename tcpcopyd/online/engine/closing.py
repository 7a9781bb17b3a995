"""How sessions end: when both sides are done, the client's reset delivered, a limit
reached, the table full. Every end is counted by its reason (a ``counters.SESSIONS_*``
index) and, unless the target already reset it, sends a reset that frees the target's
connection at once."""
from __future__ import annotations

import logging

from tcpcopyd.net.packet import ACK, seq_add
from tcpcopyd.online import counters as C
from tcpcopyd.online.engine.output import send_reset
from tcpcopyd.online.engine.state import CLOSE_LINGER, TARGET_BUSY, EngineState
from tcpcopyd.online.session import (
    CLIENT_FIN,
    CLIENT_RST,
    ESTABLISHED,
    SYN_SENT,
    TARGET_FIN,
    Session,
    State,
)

log = logging.getLogger("tcpcopyd.engine")


def close(e: EngineState, s: Session, reason: int, send_rst: bool = True) -> None:
    """End ``s``, counted under ``reason``; free its slot, its buffers, its registration."""
    if s.freed:
        return
    if send_rst and s.state & (ESTABLISHED | SYN_SENT):
        seq = s.snd_nxt if s.state & ESTABLISHED else seq_add(s.isn, 1)
        send_reset(e, s, seq, s.rcv_nxt, ACK)
    s.freed = True
    if log.isEnabledFor(logging.DEBUG):
        log.debug("session %s ends: %s (state %s)", s.describe(), C.NAMES[reason],
                  State(s.state & 0xFF))
    e.counters[reason] += 1
    if e.observer is not None and s.copy == 0:
        e.observer.closed(s.cap or s.key)
    if e.pool is not None and s.copy == 0:
        e.pool.withdraw(s.cap or s.key)
    del e.sessions[s.key]
    e.idle.pop(s.key, None)
    e.busy.pop(s.key, None)
    if e.reuse:
        e.reuse.ended(s.key)
    if s.cap is not None and e.copies is not None:
        e.copies.remove(s)
    e.control.unregister(s)
    if s.in_table and e.table is not None:
        e.table.clear(s.slot)
    e.free_slots.append(s.slot)
    e.dirty.discard(s)
    e.buffered_total -= s.buffered
    if s.ooo is not None:
        e.ooo_bytes -= s.ooo.bytes
        e.gapped.pop(s, None)
    s.unsent.clear()
    s.unacked.clear()
    s.ooo = None


def overflow(e: EngineState, s: Session, why: str) -> None:
    log.warning("session %s: %s: reset", s.describe(), why)
    close(e, s, C.SESSIONS_OVERFLOW)


def check_end(e: EngineState, s: Session, now: float) -> None:
    """End ``s`` if both sides are done, or its client's reset is delivered; else, when
    only the target is left to finish, look again when it may have."""
    st = s.state
    if st & CLIENT_RST:
        if now >= s.close_at:
            close(e, s, C.SESSIONS_CLOSED)
        elif not s.unsent and not s.unacked and not s.ooo:
            if st & TARGET_FIN or now - s.target_seen >= TARGET_BUSY:
                close(e, s, C.SESSIONS_CLOSED)
            else:
                # delivered; the target is still answering (a download): let it finish
                s.close_at = now + TARGET_BUSY
                e.schedule(s, s.close_at)
        return
    if st & CLIENT_FIN and st & TARGET_FIN and not s.unacked and len(s.unsent) == 1 \
            and not s.unsent[0].payload:
        # both sides are done and only the client's FIN is left: a reset (at the FIN's
        # sequence number) ends the target's connection at once, with one packet less
        close(e, s, C.SESSIONS_CLOSED)
        return
    if st & CLIENT_FIN and s.snd_una == s.cap_nxt and not s.unacked:
        if st & TARGET_FIN:
            close(e, s, C.SESSIONS_CLOSED)
        elif not s.close_at:
            s.close_at = now + CLOSE_LINGER
            e.schedule(s, s.close_at)


def in_flight(s: Session) -> bool:
    """Whether ``s`` has data on its way, held, or an answer to wait for."""
    return bool(s.unsent or s.unacked or s.ooo or s.awaiting)


def place(e: EngineState, s: Session) -> None:
    """``s`` was active: to the back of the idle or the busy line, by whether it has data
    in flight."""
    key = s.key
    if in_flight(s):
        e.idle.pop(key, None)
        line = e.busy
    else:
        e.busy.pop(key, None)
        line = e.idle
    line[key] = s
    line.move_to_end(key)


def evict_oldest(e: EngineState) -> None:
    """The table is full: reset the least recently active session with nothing in flight,
    or, when every session has data in flight, the least recently active one. O(1)
    amortized: a session found in the idle line with data since moves to the busy one."""
    idle = e.idle
    while idle:
        s = next(iter(idle.values()))
        if in_flight(s):
            place(e, s)
            continue
        break
    victim = next(iter((idle or e.busy).values()))
    if log.isEnabledFor(logging.DEBUG):
        log.debug("session table full: evicting %s", victim.describe())
    close(e, victim, C.SESSIONS_EVICTED)    # counted: a flood would flood the log
