"""The copies of each captured session (-n, -f, -c, -H): which copies are open, and the
address and port the target sees for a new one (``rewrite.Rewrite`` picks them).

A captured session is keyed ``(client ip, client port, target ip, target port)``; each of
its ``n`` copies is a ``Session`` of its own, keyed by what the target sees. The engine
asks here for a new copy's key, records the copy when it opens and forgets it when it
ends; a SYN with a new sequence number on a captured session (the client reused its port)
starts a new group, whose copies get ports of their own.
"""
from __future__ import annotations

from tcpcopyd.online.rewrite import Rewrite
from tcpcopyd.online.session import Session


class Copies:
    """The open copies of each captured session (-n/-f/-c/-H) and the port each copy uses on the
    target."""

    def __init__(self, rewrite: Rewrite) -> None:
        self.rewrite = rewrite
        self.n = rewrite.copies
        self.groups: dict[tuple, list[Session | None]] = {}   # captured key -> copies

    def group(self, cap: tuple) -> list[Session | None] | None:
        return self.groups.get(cap)

    def reused(self, cap: tuple, isn: int) -> list[Session]:
        """A SYN of ISN ``isn`` on ``cap``: if its open copies have another ISN, the client
        reused the port; they leave the group (to finish or end) and are returned."""
        group = self.groups.get(cap)
        if group is None or not any(c is not None and c.isn != isn for c in group):
            return []
        del self.groups[cap]
        return [c for c in group if c is not None]

    def key_for(self, cap: tuple, sessions: dict) -> tuple | None:
        """The key of a new copy of ``cap``: its address and a port of this worker's class
        that no session toward the same target uses; None if the class is full."""
        src = self.rewrite.address(cap[0])
        tip, tport = cap[2], cap[3]
        sport = self.rewrite.port(src, lambda p: (src, p, tip, tport) in sessions)
        return None if sport is None else (src, sport, tip, tport)

    def add(self, s: Session, cap: tuple, copy: int) -> None:
        s.cap, s.copy = cap, copy
        group = self.groups.get(cap)
        if group is None:
            group = self.groups[cap] = [None] * self.n
        group[copy] = s

    def remove(self, s: Session) -> None:
        cap = s.cap
        if cap is None:
            return
        group = self.groups.get(cap)
        if group is not None and group[s.copy] is s:
            group[s.copy] = None
            if not any(group):
                del self.groups[cap]
