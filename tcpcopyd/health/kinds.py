"""The daemons that status and metrics can describe, by the kind number their shm segment
carries: each daemon's counters module registers its own (name, counters, which are gauges,
which count loss), so this layer never imports a daemon."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    """One daemon's name and the meaning of the counters in its workers' records."""
    prog: str
    names: tuple[str, ...]          # counter names, by position in a worker's record
    help: dict[str, str]            # what each counter counts ("gauge: ..." for gauges)
    gauges: frozenset[str]          # counters that are levels, not totals
    drops: frozenset[str]           # counters of lost or refused work


KINDS: dict[int, Kind] = {}


def register(number: int, prog: str, counters: Iterable[tuple[str, str]],
             gauges: frozenset[str], drops: frozenset[str]) -> None:
    """Make segments of kind ``number`` readable by status and metrics."""
    table = tuple(counters)
    KINDS[number] = Kind(prog, tuple(n for n, _ in table), dict(table), gauges, drops)


def by_prog(prog: str) -> Kind:
    return next(k for k in KINDS.values() if k.prog == prog)
