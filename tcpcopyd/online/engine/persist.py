"""Sessions in the shm table: written when they changed (so a new worker carries them on),
and read back by that new worker."""
from __future__ import annotations

from shm.seqlock import TornRead
from tcpcopyd.online import counters as C
from tcpcopyd.online.engine.state import RTO_INITIAL, EngineState
from tcpcopyd.online.session import SYN_SENT, Session


def sync_table(e: EngineState) -> None:
    """Write the sessions changed since the last call to their shm slots (one that opened
    and ended in between never reaches the table: a free slot stays clear)."""
    if e.table is not None:
        write = e.table.write
        for s in e.dirty:
            if not s.freed:
                write(s.slot, s.slot_values())
                s.in_table = True
    e.dirty.clear()
    e.counters[C.SESSIONS_ACTIVE] = len(e.sessions)


def restore(e: EngineState, now: float) -> int:
    """Carry on the sessions an earlier worker left in our slots of the shm table."""
    if e.table is None:
        return 0
    free = []
    for slot in e.free_slots:
        try:
            v = e.table.read(slot)
        except TornRead:
            # the previous worker died in the middle of writing this slot: its session is
            # lost (the client's next data opens it again with a fake SYN)
            e.table.clear(slot)
            e.counters[C.SESSIONS_TORN] += 1
            free.append(slot)
            continue
        if not v[0]:
            free.append(slot)
            continue
        s = Session.from_slot(slot, v)
        e.sessions[s.key] = s
        e.idle[s.key] = s
        if e.observer is not None:
            e.observer.opened(s.key)
        if s.state & SYN_SENT:
            e.arm(s, now + RTO_INITIAL)
    e.free_slots = free
    n = len(e.sessions)
    e.counters[C.SESSIONS_RESTORED] += n
    return n
