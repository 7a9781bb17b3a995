"""One turn of the online loop, the same for the live worker and the offline replay: the
control links connected when due, a wait for events no longer than the engine's next timer,
the control links' events handled, and what is due sent."""
from __future__ import annotations

import select
import time

from tcpcopyd.online.control import ControlGroup
from tcpcopyd.online.engine import Engine


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
