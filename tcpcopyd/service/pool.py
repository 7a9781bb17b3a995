"""A pool of workers that grows and shrinks with the load (tcpcopyd's workers = auto), in
the master.

Once a second the master takes a sample of the workers that capture: each one's CPU time
over the last second (as a share of one CPU) and its capture lag. ``Policy`` turns the
samples into decisions, ``Pool`` carries them out:

- *grow* when the busiest worker used more than ``grow_at`` of its CPU in GROW_AFTER
  samples in a row, or lags in as many (a capture lag over a quarter of ``max_lag``, the
  oldest packet of the last 0.1 s over LATE_MS old, or packets dropped for want of
  speed): every running worker is told to share the pool (it
  publishes its sessions), and once each has said so (or after SHARE_WAIT), the new
  worker's capture socket joins the fanout group and the worker starts;
- *shrink* when the load of the capturing workers, spread over one worker fewer, stayed
  below ``shrink_at`` for ``shrink_after`` seconds: the newest worker retires. The master
  closes its descriptor of that worker's socket, the worker reads what its ring holds and
  closes its own: the socket leaves the group, the others capture its flows and hand it
  the packets of its sessions until the last one ends; then it exits and its index is
  parked. The last worker alone is told so, and stops publishing.

After every change the samples start afresh, so that the pool settles before the next.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from shm import seqlock
from shm.segment import POOL_ALONE, POOL_PARKED, POOL_RETIRING, POOL_SHARED, Segment

log = logging.getLogger("pool")

# seconds between two samples
SAMPLE_EVERY = 1.0
# samples in a row that must be busy before a worker is added
GROW_AFTER = 3
# a capture lag over this share of max_lag is a reason to grow, and so is one over LATE_MS
# in the last 0.1 s (capture_lag_peak_ms): a copy that late is no longer live
LAG_SHARE = 0.25
LATE_MS = 20
# no worker is added while more than this share of the captured packets are handed over
SETTLING = 0.1
# seconds the master waits for the running workers to publish their sessions before the
# new worker's socket joins the group anyway
SHARE_WAIT = 2.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Load:
    """One sample of the capturing workers."""
    busiest: float      # the busiest one's share of its CPU (1.0: all of it)
    total: float        # all of theirs added up, in CPUs
    lagging: bool       # one lags, or drops packets for want of speed
    handed: float = 0.0  # the share of the captured packets handed to another worker


class Policy:
    """When to add a worker and when to give one back, from the samples alone."""

    def __init__(self, least: int, most: int, grow_at: float, shrink_at: float,
                 shrink_after: float) -> None:
        self.least, self.most = least, most
        self.grow_at, self.shrink_at, self.shrink_after = grow_at, shrink_at, shrink_after
        self.busy_run = 0                 # busy samples in a row
        self.calm_since: float | None = None

    def decide(self, now: float, size: int, load: Load) -> int:
        """+1: add a worker, -1: give one back, 0: keep the pool as it is."""
        busy = load.busiest >= self.grow_at or load.lagging
        self.busy_run = self.busy_run + 1 if busy else 0
        # while many packets still go to the worker holding their session, the last
        # worker added has not taken its share of the load yet: another would not either
        if busy and self.busy_run >= GROW_AFTER and size < self.most and \
                load.handed < SETTLING:
            self.settle()
            return 1
        if not busy and size > self.least and load.total / (size - 1) < self.shrink_at:
            if self.calm_since is None:
                self.calm_since = now
            if now - self.calm_since >= self.shrink_after:
                self.settle()
                return -1
        else:
            self.calm_since = None
        return 0

    def settle(self) -> None:
        """A change was made: judge the pool it made on samples of its own."""
        self.busy_run = 0
        self.calm_since = None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, seconds (None: it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Pool:
    """The master's side of a pool that grows and shrinks: which worker indexes capture,
    which retire, and the changes from one to the other (see the module's words)."""

    def __init__(self, seg: Segment, policy: Policy, join: Callable[[int], None],
                 leave: Callable[[int], None], max_lag: float, counters: dict[str, int]
                 ) -> None:
        """``join(i)`` opens worker ``i``'s capture socket in the fanout group, ``leave(i)``
        closes the master's descriptor of it; ``counters``: where the workers' records
        hold capture_lag_ms, capture_lag_peak_ms, kernel_drops, lag_drops, captured,
        strays_handed and pool_shared."""
        self.seg = seg
        self.policy = policy
        self.join, self.leave = join, leave
        self.max_lag = max_lag
        self.at = counters
        self.capturing: set[int] = {0}
        self.retiring: set[int] = set()
        self.joining: int | None = None    # an index waiting for the others to share
        self.join_by = 0.0
        self.next_sample = 0.0
        self.cpu: dict[int, float] = {}    # pid -> CPU seconds at the last sample
        # index -> (lost packets, captured, handed over) at the last sample
        self.seen: dict[int, tuple[int, int, int]] = {}
        self.places = [POOL_PARKED] * seg.n_workers
        for index in range(seg.n_workers):
            self.place(index, POOL_ALONE if index == 0 else POOL_PARKED)

    @property
    def most(self) -> int:
        return self.policy.most

    def place(self, index: int, where: int) -> None:
        """Tell worker ``index`` its place (its supervision record's ``pool``)."""
        self.places[index] = where
        sup = self.seg.read_supervision(index)
        self.seg.write_supervision(index, sup.restarts, sup.recent_deaths, sup.last_exit,
                                   sup.respawn_at, where)

    def wanted(self, index: int) -> bool:
        """Whether a worker should run at ``index`` (started again if it died)."""
        return index in self.capturing

    def describe(self) -> str:
        words = f"{len(self.capturing)} of {self.policy.least}-{self.most} capturing"
        return words + (f", {len(self.retiring)} retiring" if self.retiring else "")

    # ------------------------------------------------------------------ each turn
    def step(self, now: float, pids: dict[int, int]) -> list[int]:
        """The master's turn (``pids``: index -> pid of the workers alive); returns the
        indexes of workers to start now."""
        start = []
        if self.joining is not None and (self._all_share(pids) or now >= self.join_by):
            start.append(self._join(self.joining))
        if now < self.next_sample:
            return start
        self.next_sample = now + SAMPLE_EVERY
        load = self.sample(pids)
        if load is None or self.joining is not None:
            return start
        change = self.policy.decide(now, len(self.capturing), load)
        log.debug("pool sample: busiest %.1f%%, total %.1f%% of a CPU, lagging %s: %+d",
                  load.busiest * 100, load.total * 100, load.lagging, change)
        if change > 0:
            self._grow(now, pids, load)
        elif change < 0:
            self._shrink(load)
        return start

    def sample(self, pids: dict[int, int]) -> Load | None:
        """The capturing workers' load since the last sample (None: the first sample of
        one of them)."""
        busiest = total = 0.0
        lagging, complete = False, True
        captured = handed = 0
        at = self.at
        cpu = {}
        for index in self.capturing:
            pid = pids.get(index)
            seconds = cpu_seconds(pid) if pid else None
            if seconds is None:
                complete = False
                continue
            cpu[pid] = seconds
            if pid in self.cpu:
                share = (seconds - self.cpu[pid]) / SAMPLE_EVERY
                busiest, total = max(busiest, share), total + share
            else:
                complete = False
            try:
                counters = self.seg.read_worker(index).counters
            except seqlock.TornRead:
                continue
            now_seen = (counters[at["kernel_drops"]] + counters[at["lag_drops"]],
                        counters[at["captured"]], counters[at["strays_handed"]])
            before = self.seen.get(index, now_seen)
            if counters[at["capture_lag_ms"]] > self.max_lag * 1000 * LAG_SHARE or \
                    counters[at["capture_lag_peak_ms"]] > LATE_MS or now_seen[0] > before[0]:
                lagging = True
            captured += now_seen[1] - before[1]
            handed += now_seen[2] - before[2]
            self.seen[index] = now_seen
        self.cpu = cpu
        return Load(busiest, total, lagging, handed / captured if captured > 0 else 0.0) \
            if complete else None

    # ------------------------------------------------------------------ changes
    def _grow(self, now: float, pids: dict[int, int], load: Load) -> None:
        free = [i for i in range(self.most)
                if i not in self.capturing and i not in self.retiring]
        if not free:
            return
        for index in self.capturing | self.retiring:
            self.place(index, POOL_SHARED if index in self.capturing else POOL_RETIRING)
        self.joining, self.join_by = free[0], now + SHARE_WAIT
        log.info("the pool grows: worker %d joins once the %d running share their sessions "
                 "(load: busiest %.0f%%, lagging %s)", free[0] + 1, len(pids),
                 load.busiest * 100, load.lagging)

    def _all_share(self, pids: dict[int, int]) -> bool:
        for index in pids:
            try:
                if not self.seg.read_worker(index).counters[self.at["pool_shared"]]:
                    return False
            except seqlock.TornRead:
                return False
        return True

    def _join(self, index: int) -> int:
        self.joining = None
        self.join(index)
        self.capturing.add(index)
        self.place(index, POOL_SHARED)
        self.cpu.clear()
        self.policy.settle()
        return index

    def _shrink(self, load: Load) -> None:
        index = max(self.capturing)
        if index == 0:
            return
        self.capturing.discard(index)
        self.retiring.add(index)
        self.place(index, POOL_RETIRING)
        self.leave(index)
        self.cpu.clear()
        log.info("the pool shrinks: worker %d retires (load: %.2f CPU over %d workers)",
                 index + 1, load.total, len(self.capturing) + 1)

    def retired(self, index: int, code: int, why: str) -> None:
        """The worker at ``index`` ended while retiring: its index is parked."""
        self.retiring.discard(index)
        self.place(index, POOL_PARKED)
        if code == 0:
            log.info("worker %d left the pool", index + 1)
        else:
            log.warning("worker %d %s while retiring: the sessions it still held are not "
                        "copied further", index + 1, why)
        if len(self.capturing) == 1 and not self.retiring:
            self.place(next(iter(self.capturing)), POOL_ALONE)
