"""One turn of the online loop, the same for the live worker and the offline replay: the
control links connected when due, a wait for events no longer than the engine's next timer,
the control links' events handled, and what is due sent; and the live worker's loop of
turns (``serve``), compiled with them (tcpcopyd/native.py): the worker process, with its
signals and its rarer work, stays interpreted and is called back for that work only."""
from __future__ import annotations

import select
import time
from collections.abc import Callable
from typing import Final, Protocol

from tcpcopyd.net.reader import CaptureReader
from tcpcopyd.online.compare import Exchanges
from tcpcopyd.online.control import ControlGroup
from tcpcopyd.online.engine import Engine

# packets read from the capture socket before the loop looks at anything else
CAPTURE_BATCH: Final = 512
# seconds of packet work after which the loop turns to its timers and heartbeat anyway
WORK_SLICE: Final = 0.05
# how often counters and heartbeat reach shm, seconds
SYNC_INTERVAL: Final = 0.1
# how often changed sessions reach the shm table, seconds: a worker that dies loses at
# most this much of its sessions' news (the next worker resynchronizes those sessions),
# and a short connection that ends within it costs no write at all
TABLE_INTERVAL: Final = 0.02
# how often idle sessions are looked for, seconds
EXPIRE_INTERVAL: Final = 1.0

OnPacket = Callable[[memoryview | bytearray, int, float], None]


class Host(Protocol):
    """What the loop needs of its worker process: whether a signal asked it to stop, and
    the work that is not per packet."""
    stop: str | None

    def read_answers(self, on_packet: OnPacket, now: float) -> None: ...

    def on_link_event(self, now: float) -> None: ...

    def on_interfaces_event(self, now: float) -> None: ...

    def read_strays(self, now: float) -> None: ...

    def sync(self) -> None: ...


def serve(host: Host, engine: Engine, control: ControlGroup, epoll: select.epoll,
          reader: CaptureReader, on_packet: OnPacket, fds: tuple[int, int, int, int, int],
          exchanges: Exchanges | None) -> None:
    """Turns until ``host.stop``: the events of each (the capture socket's packets, the
    online server's answers, link and interface events, the control links'), what is due
    sent, and on their intervals the shm table, idle sessions and ``host.sync``. ``fds``:
    the capture socket, the answers' socket, the link watch, the interface follower, the
    inbox of a pool's handed packets (-1: none)."""
    capfd, answersfd, watchfd, followfd, inboxfd = fds
    next_sync = next_expire = next_table = 0.0
    while host.stop is None:
        events, now = wait(engine, control, epoll, SYNC_INTERVAL)
        for fd, ev in events:
            if fd == capfd:
                # the rest, if any, in the next round, after the timers
                reader.read(on_packet, now, CAPTURE_BATCH, WORK_SLICE)
            elif fd == answersfd:
                # the requests first: an answer is sent after its request arrived, so the
                # capture socket holds that request by now
                reader.read(on_packet, now, CAPTURE_BATCH, WORK_SLICE)
                host.read_answers(on_packet, now)
            elif fd == watchfd:
                host.on_link_event(now)
            elif fd == followfd:
                host.on_interfaces_event(now)
            elif fd == inboxfd:
                host.read_strays(now)
            else:
                on_control_event(engine, control, fd, ev, now)
        send_due(engine, now)
        if now >= next_table:
            # the session table is kept current, so a new worker can carry sessions on
            next_table = now + TABLE_INTERVAL
            engine.sync_table()
        if now >= next_sync:
            next_sync = now + SYNC_INTERVAL
            if now >= next_expire:
                next_expire = now + EXPIRE_INTERVAL
                engine.expire_idle(now)
                if exchanges is not None:
                    exchanges.sweep(now)
            host.sync()


def wait(engine: Engine, control: ControlGroup, epoll: select.epoll,
         most: float) -> tuple[list[tuple[int, int]], float]:
    """The start of a turn: links due connected (a link that came up has the live sessions
    registered again on it), then the events of at most ``most`` seconds, fewer when an
    engine timer is due sooner. Returns the events and the time after the wait."""
    now = time.monotonic()
    if control.maybe_connect(now):
        engine.on_control_up(now)
    nt = engine.next_timer()
    timeout = most if nt is None else max(0.0, min(most, nt - now))
    try:
        events = epoll.poll(timeout)
    except InterruptedError:
        events = []
    return events, time.monotonic()


def on_control_event(engine: Engine, control: ControlGroup, fd: int, ev: int,
                     now: float) -> None:
    """An epoll event of a control link: reply headers go to the engine; a link that came
    up gets the live sessions registered again."""
    link = control.link_of(fd)
    if link is None:
        return
    headers, came_up = link.on_event(ev, now)
    if came_up:
        engine.on_control_up(now)
    on_reply = engine.on_reply
    for h in headers:
        on_reply(h, now)


def send_due(engine: Engine, now: float) -> None:
    """The end of a turn: what the events queued is sent (control messages first, see
    ``Engine.flush``), then the engine's due timers run."""
    engine.flush(now)
    nt = engine.next_timer()
    if nt is not None and nt <= now:
        engine.tick(now)
