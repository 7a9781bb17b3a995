"""A worker process as the arbiter sees it (gunicorn's model).

The master builds the worker object before the fork, where it must not touch the process.
In the child, ``init_process()`` has the worker die with its master, resets the signals,
pins the CPU, sets the title and calls ``setup()``, where everything that can fail is
opened and built; then it gives up every capability but ``capabilities`` (what its open
sockets still need) and writes the worker's first heartbeat. From then on the worker is
*booted*, and ``run()`` serves until a stop signal. A failure before booted is a boot
error: the arbiter stops the service with its message and exit code, since a new worker
would fail the same way. A failure after booted is a crash: the arbiter starts another
worker (with backoff, see ``arbiter``).
"""
from __future__ import annotations

import logging
import os
import signal
import time

from setproctitle import setproctitle

from shm.segment import LinkState, Segment, pack_links
from shm.seqlock import TornRead
from tcpcopyd.service import capabilities, logs

log = logging.getLogger("worker")

# a worker that loses packets because it does not keep up says so at most this often,
# seconds (its counters say it all the time)
BEHIND_WARN_INTERVAL = 60.0


class BootError(Exception):
    """A worker cannot start; ``code`` is the exit status the service stops with."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class WorkerProcess:
    """A worker process as the arbiter sees it: built in the master, forked, set up in the child
    (its boot), then run; the daemons' workers derive from it."""

    # the capabilities a booted worker keeps (documented in the README, checked at boot)
    capabilities: tuple[str, ...] = ()
    # a worker of a pool that grows and shrinks by itself (tcpcopyd's workers = auto)
    pooled = False

    def __init__(self, index: int, n_workers: int, cpu: int, seg: Segment) -> None:
        self.master_pid = os.getpid()       # built in the master
        self.index = index
        self.n_workers = n_workers
        self.cpu = cpu
        self.seg = seg
        self.stop: str | None = None     # "graceful" or "fast" once asked to stop
        self.booted = False
        self.started = 0.0
        self.counters: list[int] = []    # published with each heartbeat
        self.cpus_allowed = len(os.sched_getaffinity(0))   # the master's, before pinning
        self.behind = 0                  # packets lost for want of speed, not yet said
        self.behind_said = -BEHIND_WARN_INTERVAL

    @property
    def title(self) -> str:
        """The process title, e.g. ``tcpcopyd: worker 2/4 cpu=1 [eth0]``."""
        raise NotImplementedError

    def init_process(self) -> None:
        """In the child: everything before serving. Raises if the worker cannot boot."""
        capabilities.die_with_parent(signal.SIGTERM)
        if os.getppid() != self.master_pid:
            raise BootError("the master died while the worker started")
        for sig, how in ((signal.SIGTERM, "graceful"), (signal.SIGINT, "fast"),
                         (signal.SIGQUIT, "fast")):
            signal.signal(sig, lambda _s, _f, how=how: self._on_stop(how))
        # reloads are the master's; log reopens are forwarded by the master
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, lambda _s, _f: logs.reopen())
        try:
            os.sched_setaffinity(0, {self.cpu})
        except OSError as e:
            log.warning("cannot pin worker %d to cpu %d: %s", self.index + 1, self.cpu, e)
        setproctitle(self.title)
        self.started = time.time()
        self.setup()
        capabilities.keep_only(self.capabilities)
        self.carry_counters()
        self.heartbeat()
        self.booted = True

    def setup(self) -> None:
        """Open and build what ``run()`` needs (sockets, tables, sessions carried on);
        raise ``BootError`` (or any exception) if that cannot be done."""

    def run(self) -> None:
        raise NotImplementedError

    def carry_counters(self) -> None:
        """A worker started again at an index goes on from the counters its predecessor
        published, so that totals never go back (gauges are set again at the first
        heartbeat's sync). A record torn by a kill is lost with its counts."""
        try:
            previous = self.seg.read_worker(self.index).counters
        except TornRead:
            return
        for i, v in enumerate(previous[:len(self.counters)]):
            self.counters[i] += v

    def falling_behind(self, lost: int, what: str, setting: str, now: float) -> None:
        """``lost`` packets (``what`` they are, and what losing them costs) were lost since
        the last call because this worker did not keep up: said in the log at most once a
        BEHIND_WARN_INTERVAL, with ``setting``, which shares the load among more workers
        (the default is one worker: the cheapest pool for a load it keeps up with)."""
        self.behind += lost
        if not self.behind or now < self.behind_said + BEHIND_WARN_INTERVAL:
            return
        n, cpus = self.n_workers, self.cpus_allowed
        advice = (f"the pool adds workers while one lags ({setting} = auto: at most {n}, "
                  "one per CPU)" if self.pooled else
                  f"{setting} = {min(2 * n, cpus)} shares the load among more workers "
                  f"(this host lets it use {cpus} CPUs)" if n < cpus else
                  f"every CPU it may use has a worker already ({setting} = {n}): the load "
                  "is beyond this host")
        log.warning("worker %d/%d does not keep up: %d %s; %s", self.index + 1, n,
                    self.behind, what, advice)
        self.behind, self.behind_said = 0, now

    def link_states(self) -> list[LinkState]:
        """The worker's links to its peers, for status (none by default)."""
        return []

    def mirror_sources(self) -> bytes:
        """The worker's counts per mirror source, packed (none by default)."""
        return b""

    def heartbeat(self) -> None:
        """Publish the counters and links and say "alive" to the master (the worker's shm
        record)."""
        self.seg.write_worker(self.index, os.getpid(), self.cpu, self.started, self.counters,
                              pack_links(self.link_states()), self.mirror_sources())

    def _on_stop(self, how: str) -> None:
        if self.stop != "fast":
            self.stop = how
