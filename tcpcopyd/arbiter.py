"""The master process of either daemon: forks pinned workers, reaps and respawns them,
watches their heartbeats in shm, and stops them (gracefully on SIGTERM, fast on
SIGINT/SIGQUIT). SIGHUP reloads the settings, SIGUSR1 reopens the log files (the master's
and, forwarded, the workers'). Under systemd (``Type=notify``) it says READY once every
worker serves, keeps a STATUS line current and feeds the watchdog.
Signal handlers only queue the signal; the main loop does the work."""
from __future__ import annotations

import errno
import logging
import os
import select
import signal
import time
from collections.abc import Callable

from setproctitle import setproctitle

from shm import seqlock
from shm.segment import Segment
from tcpcopyd import logs
from tcpcopyd.sdnotify import Notifier

log = logging.getLogger("arbiter")

# a worker that fails before it starts serving exits with this code; the master then stops
# the service instead of fork-looping
WORKER_BOOT_ERROR = 3
# seconds a graceful stop may take before workers are killed
GRACEFUL_TIMEOUT = 4.0
# a worker whose heartbeat is older than this is killed and replaced
HEARTBEAT_TIMEOUT = 10.0
# a worker younger than this gets no heartbeat check yet
BOOT_GRACE = 5.0
# seconds between two STATUS lines sent to systemd
STATUS_INTERVAL = 5.0
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, signal.SIGHUP,
           signal.SIGUSR1)


# stop signals that arrived before the arbiter ran: the master had resources to release
EARLY_SIGNALS: list[int] = []


def catch_early_signals() -> None:
    """Called first thing by a daemon: SIGTERM/SIGINT/SIGQUIT during start-up are kept for
    the arbiter (which then stops at once, cleaning up) instead of killing the master with
    its iptables rules and shm segment left behind."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, lambda s, _f: EARLY_SIGNALS.append(s))


class Arbiter:
    def __init__(self, prog: str, label: str, n_workers: int, seg: Segment,
                 boot: Callable[[int, int], None], cpus: list[int],
                 status: Callable[[], str] | None = None,
                 reload: Callable[[], None] | None = None) -> None:
        """``boot(index, cpu)`` runs in the forked child and never returns normally;
        ``status()`` gives systemd's STATUS line, ``reload()`` applies a SIGHUP."""
        self.prog = prog
        self.label = label
        self.n_workers = n_workers
        self.seg = seg
        self.boot = boot
        self.cpus = cpus
        self.workers: dict[int, int] = {}       # pid -> worker index
        self.started: dict[int, float] = {}     # pid -> start time
        self.signals: list[int] = []
        self.stopping: str | None = None
        self.exit_code = 0
        self.reason = ""
        self._pipe_r, self._pipe_w = os.pipe()
        self.status = status
        self.reload = reload
        self.notifier = Notifier()
        self.ready = False
        self._next_status = 0.0

    # ---------------------------------------------------------------- main loop
    def run(self) -> int:
        setproctitle(f"{self.prog}: master [{self.label}]")
        os.set_blocking(self._pipe_r, False)
        os.set_blocking(self._pipe_w, False)
        signal.set_wakeup_fd(self._pipe_w)
        for sig in HANDLED:
            signal.signal(sig, self._queue_signal)
        # a stop asked for while the daemon was starting (see catch_early_signals)
        self.signals.extend(EARLY_SIGNALS)
        EARLY_SIGNALS.clear()
        if not self.signals:
            for i in range(self.n_workers):
                self.spawn(i)
        while True:
            self.wait(1.0)
            while self.signals:
                self.handle(self.signals.pop(0))
            self.reap()
            if self.stopping:
                self.notifier.send("STOPPING=1")
                return self.finish()
            self.check_heartbeats()
            self.spawn_missing()
            self.tell_systemd()

    def tell_systemd(self) -> None:
        now = time.monotonic()
        if not self.ready and self.all_serving():
            self.ready = True
            log.info("ready: %d worker(s) serving", self.n_workers)
            self.notifier.send("READY=1", f"STATUS={self._status()}")
            self._next_status = now + STATUS_INTERVAL
        elif self.ready and now >= self._next_status:
            self._next_status = now + STATUS_INTERVAL
            self.notifier.send(f"STATUS={self._status()}")
        self.notifier.feed_watchdog()

    def _status(self) -> str:
        head = f"{len(self.workers)}/{self.n_workers} workers"
        return f"{head}; {self.status()}" if self.status else head

    def all_serving(self) -> bool:
        """Every worker is up and has written its first heartbeat (socket/queue bound)."""
        if len(self.workers) < self.n_workers:
            return False
        for pid, index in self.workers.items():
            try:
                rec = self.seg.read_worker(index)
            except seqlock.TornRead:
                return False
            if rec.pid != pid or rec.heartbeat < self.started[pid] - 1:
                return False
        return True

    def _queue_signal(self, sig: int, _frame: object) -> None:
        self.signals.append(sig)

    def wait(self, timeout: float) -> None:
        if self.signals:
            return
        try:
            ready, _, _ = select.select([self._pipe_r], [], [], timeout)
        except InterruptedError:
            return
        if ready:
            try:
                while os.read(self._pipe_r, 4096):
                    pass
            except BlockingIOError:
                pass

    def handle(self, sig: int) -> None:
        if sig == signal.SIGCHLD:
            return
        if sig == signal.SIGHUP:
            if self.reload and not self.stopping:
                usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={usec}")
                self.reload()
                self.notifier.send("READY=1")
            return
        if sig == signal.SIGUSR1:
            logs.reopen()
            for pid in self.workers:
                _kill(pid, signal.SIGUSR1)
            log.info("SIGUSR1: log files reopened (master and %d worker(s))", len(self.workers))
            return
        if self.stopping:
            if sig in (signal.SIGINT, signal.SIGQUIT):
                self.stopping = "fast"
            return
        self.stopping = "graceful" if sig == signal.SIGTERM else "fast"
        log.info("%s: stopping (%s)", signal.Signals(sig).name, self.stopping)

    # ---------------------------------------------------------------- workers
    def spawn(self, index: int) -> None:
        cpu = self.cpus[index % len(self.cpus)]
        pid = os.fork()
        if pid == 0:
            code = WORKER_BOOT_ERROR
            try:
                signal.set_wakeup_fd(-1)
                for sig in HANDLED:
                    signal.signal(sig, signal.SIG_DFL)
                # reloads are the master's; log reopens are forwarded by the master
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                signal.signal(signal.SIGUSR1, lambda _s, _f: logs.reopen())
                self.notifier.close()
                os.close(self._pipe_r)
                os.close(self._pipe_w)
                self.boot(index, cpu)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                log.exception("worker %d crashed", index)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        self.workers[pid] = index
        self.started[pid] = time.time()
        log.info("worker %d/%d started: pid %d, cpu %d", index + 1, self.n_workers, pid, cpu)

    def spawn_missing(self) -> None:
        alive = set(self.workers.values())
        for i in range(self.n_workers):
            if i not in alive:
                self.seg.add_restart(i)
                self.spawn(i)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if pid == 0:
                return
            index = self.workers.pop(pid, None)
            self.started.pop(pid, None)
            if index is None:
                continue  # not ours
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
                why = f"killed by {signal.Signals(sig).name}"
                if sig == signal.SIGKILL and not self.stopping:
                    why += " (out of memory?)"
            else:
                code = os.WEXITSTATUS(status)
                why = f"exited with code {code}"
                if code == WORKER_BOOT_ERROR and not self.stopping:
                    self.reason = f"worker {index + 1} could not start"
                    self.exit_code = 1
                    self.stopping = "fast"
            if self.stopping:
                log.info("worker %d (pid %d) %s", index + 1, pid, why)
            else:
                log.warning("worker %d (pid %d) %s; starting a new one", index + 1, pid, why)

    def check_heartbeats(self) -> None:
        now = time.time()
        for pid, index in list(self.workers.items()):
            started = self.started.get(pid, now)
            if now - started < BOOT_GRACE:
                continue
            try:
                rec = self.seg.read_worker(index)
            except seqlock.TornRead:
                continue  # stopped in the middle of a write: judged on the next round
            # a heartbeat of an earlier worker of this index does not count for this one
            last = rec.heartbeat if rec.pid == pid else started
            if now - last > HEARTBEAT_TIMEOUT:
                log.warning("worker %d (pid %d) silent for %.0fs: killing it", index + 1, pid,
                            now - last)
                _kill(pid, signal.SIGKILL)

    def finish(self) -> int:
        sig = signal.SIGTERM if self.stopping == "graceful" else signal.SIGQUIT
        for pid in self.workers:
            _kill(pid, sig)
        deadline = time.time() + (GRACEFUL_TIMEOUT if sig == signal.SIGTERM else 1.0)
        while self.workers and time.time() < deadline:
            self.reap()
            time.sleep(0.02)
        for pid in list(self.workers):
            log.warning("worker pid %d did not stop: killing it", pid)
            _kill(pid, signal.SIGKILL)
        while self.workers:
            self.reap()
            time.sleep(0.01)
        if self.reason:
            log.error("%s: %s", self.prog, self.reason)
        return self.exit_code


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def write_pidfile(path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")


def remove_pidfile(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def allowed_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))
