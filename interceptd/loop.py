"""A worker's loop of turns: the target's packets from its queue (or capture socket), the
other workers' hand-offs, the control connections' events served in turn, the replies held
for their session looked up again when due, and what the turn routed sent. Compiled
(tcpcopyd/native.py); the worker process, with its signals and its rarer work (the
heartbeat, the hand-off rings), stays interpreted and is called back for that work."""
from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable
from typing import Final, Protocol

from interceptd import counters as C
from interceptd.control import ControlServer
from interceptd.nfqueue import QueueReader
from interceptd.replies import ReplyPath
from interceptd.router import Router

log = logging.getLogger("interceptd.worker")

# how often counters/heartbeat reach shm and held replies are looked at again, seconds
SYNC_INTERVAL: Final = 0.1
QUEUED: Final = C.INDEX["queued"]
MALFORMED: Final = C.INDEX["malformed"]
# messages read from the NFQUEUE before their batch verdict and a look at the rest
QUEUE_BATCH: Final = 256
# bytes of control input (registrations: 20 bytes each) one loop turn reads at most, the
# connections served in turn: a flood of registrations, hostile or not, waits in its
# sockets (TCP slows its sender) while the target's packets are read at every turn; a full
# queue would drop them
CONTROL_TURN: Final = 32768


class Host(Protocol):
    """What the loop needs of its worker process."""
    stop: str | None

    def read_capture(self, now: float) -> None: ...

    def drain(self, now: float) -> None: ...

    def hand_off(self) -> None: ...

    def sync(self, now: float) -> None: ...


def serve(host: Host, epoll: select.epoll, source_fd: int, wakeup: int,
          queue: QueueReader | None, replies: ReplyPath, router: Router,
          control: ControlServer, counters: list[int]) -> None:
    """Turns until ``host.stop``. ``queue``: the NFQUEUE read here (None: the worker reads
    its capture socket, ``host.read_capture``); ``wakeup``: the eventfd other workers
    signal when they handed replies to this one."""
    clock = time.monotonic
    next_sync = soon = 0.0
    turns = 0
    host.drain(clock())   # what a previous worker of this index left
    while host.stop is None:
        try:
            events = epoll.poll(SYNC_INTERVAL if not soon else
                                max(0.0, min(SYNC_INTERVAL, soon - clock())))
        except InterruptedError:
            continue
        now = clock()
        peers: list[tuple[int, int]] = []
        for fd, ev in events:
            if fd == source_fd:
                if queue is None:
                    host.read_capture(now)
                else:
                    read_queue(queue, replies, counters, now)
            elif fd == wakeup:
                try:
                    os.eventfd_read(wakeup)
                except BlockingIOError:
                    pass
                host.drain(now)
            else:
                peers.append((fd, ev))
        if peers:
            turns += 1
            serve_control(peers, control.on_event, turns, now)
        soon = router.retry_soon(now) if router.soon else 0.0
        if now >= next_sync:
            next_sync = now + SYNC_INTERVAL
            host.sync(now)
        # what the events, the look-ups and the round found for other workers
        if router.outbox:
            host.hand_off()
        control.flush()


def read_queue(queue: QueueReader, replies: ReplyPath, counters: list[int],
               now: float) -> None:
    """A batch of the queue's packets, each to the reply path, then their verdict."""
    try:
        n = queue.read(replies.handle, now, QUEUE_BATCH)
    except OSError as e:
        log.warning("NFQUEUE read: %s", e)
        return
    counters[QUEUED] += n
    counters[MALFORMED] += queue.take_malformed()


def serve_control(events: list[tuple[int, int]], on_event: Callable[[int, int, float], int],
                  turn: int, now: float, budget: int = CONTROL_TURN) -> None:
    """The control connections' events of one loop turn, up to ``budget`` bytes of input
    (``on_event`` says what it read), beginning one connection further at every ``turn``
    so that none waits behind a busier one (epoll reports them in the same order); what is
    left is reported again at the next turn."""
    start = turn % len(events)
    for fd, ev in events[start:] + events[:start]:
        if budget <= 0:
            return
        budget -= on_event(fd, ev, now)
