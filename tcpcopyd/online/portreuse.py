"""Client ports used again while the target has not got all of the previous session.

Both sessions would use the same address and port on the target, so the new one waits: its
captured segments are held here until the previous session ends (the engine then replays
them), at most HOLD seconds, after which the previous one is reset. Only without copies
(-n/-f/-c/-H give each new copy a port of its own instead). What is held counts
(``bytes``: payload plus ``cost`` per segment) against the worker's buffer limits."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Final

# how long a new session waits for the previous session of its client port, seconds
HOLD: Final = 10.0

# a captured segment held: seq, ack, flags, window, options, payload
Captured = tuple[int, int, int, int, bytes, bytes]


class PortReuse:
    """The new sessions that wait for the previous session of their client port to end, and what
    they hold meanwhile."""

    def __init__(self, cost: int = 0) -> None:
        # captured key -> (since, target, segments held)
        self.held: dict[tuple, tuple[float, tuple, list[Captured]]] = {}
        self.released: list[tuple] = []
        self.cost = cost        # bytes a held segment costs beyond its payload
        self.bytes = 0          # bytes held in all

    def __bool__(self) -> bool:
        return bool(self.held)

    def __contains__(self, cap: tuple) -> bool:
        return cap in self.held

    def hold(self, cap: tuple, now: float, target: tuple, segment: Captured) -> None:
        """The first segment (a SYN) of a new session on a port still in use."""
        self.held[cap] = (now, target, [segment])
        self.bytes += len(segment[5]) + self.cost

    def add(self, cap: tuple, segment: Captured) -> int:
        """Hold one more segment of ``cap``'s new session; returns the bytes its session
        holds now."""
        segments = self.held[cap][2]
        segments.append(segment)
        self.bytes += len(segment[5]) + self.cost
        return sum(len(seg[5]) for seg in segments) + self.cost * len(segments)

    def ended(self, key: tuple) -> None:
        """The session of ``key`` ended: a session waiting for its port may start."""
        if key in self.held:
            self.released.append(key)

    def take_released(self) -> Iterator[tuple[tuple, tuple, list[Captured]]]:
        """(captured key, target, segments) of the sessions whose wait is over."""
        released, self.released = self.released, []
        for cap in released:
            entry = self.held.pop(cap, None)
            if entry is not None:
                self.bytes -= sum(len(seg[5]) for seg in entry[2]) + self.cost * len(entry[2])
                yield cap, entry[1], entry[2]

    def overdue(self, now: float) -> list[tuple]:
        """Keys whose new session has waited longer than HOLD."""
        return [cap for cap, (since, _t, _s) in self.held.items() if now - since > HOLD]
