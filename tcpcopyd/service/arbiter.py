"""The master process of either daemon (gunicorn's arbiter): forks pinned workers, reaps
them, starts new ones, watches their heartbeats in shm, and stops them (gracefully on
SIGTERM, fast on SIGINT/SIGQUIT). SIGHUP reloads the settings, SIGUSR1 reopens the log
files (the master's and, forwarded, the workers'). Under systemd (``Type=notify``) it says
READY once every worker serves, keeps a STATUS line current and feeds the watchdog while
every worker is healthy.

Signal handlers only queue the signal; the main loop waits for one (at most a second),
dispatches it to ``handle_<name>()``, reaps, kills stale workers and starts missing ones.

Workers follow the boot protocol of ``service.worker``:
- a worker that fails before it is booted (or does not boot within BOOT_TIMEOUT) stops the
  service with the worker's message and exit code: a new one would fail the same way;
- a booted worker that dies is started again: at once the first time, then after a delay
  that doubles with each death of that worker within CRASH_WINDOW seconds (RESPAWN_DELAY,
  2x, 4x ...); CRASH_LOOP_DEATHS deaths of one worker within CRASH_WINDOW seconds (a crash
  loop, systemd's own default start limit) stop the service with exit status 1, so that
  systemd sees the failure. Deaths, restarts and the pending start are in the segment's
  supervision records, which ``tcpcopyctl status`` shows.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import signal
import time
from collections import deque
from collections.abc import Callable

from setproctitle import setproctitle

from shm import seqlock
from shm.segment import POOL_ALONE, Segment
from tcpcopyd.service import logs
from tcpcopyd.service.pageserver import PageServer
from tcpcopyd.service.pool import Pool
from tcpcopyd.service.sdnotify import Notifier
from tcpcopyd.service.startup import EARLY_SIGNALS
from tcpcopyd.service.worker import BootError, WorkerProcess

log = logging.getLogger("arbiter")

# a worker that fails before it is booted exits with this code; the master then stops the
# service instead of fork-looping
WORKER_BOOT_ERROR = 3
# exit status of the service after a crash loop (and of a boot error that names none)
EXIT_FAILURE = 1
# seconds a graceful stop may take before workers are killed
GRACEFUL_TIMEOUT = 4.0
# a booted worker whose heartbeat is older than this is killed and replaced, seconds
HEARTBEAT_TIMEOUT = 10.0
# a worker that has not booted this long after its start is killed: a boot error, seconds
BOOT_TIMEOUT = 30.0
# a worker is healthy while its heartbeat is younger than this (tcpcopyctl's "stale")
HEALTHY_HEARTBEAT = 5.0
# delay before the second start of a worker that died within CRASH_WINDOW, doubling with
# each further death, seconds (the first death is answered at once)
RESPAWN_DELAY = 0.25
RESPAWN_DELAY_MAX = 5.0
# this many deaths of one worker within CRASH_WINDOW seconds are a crash loop
CRASH_LOOP_DEATHS = 5
CRASH_WINDOW = 10.0
# seconds between two STATUS lines sent to systemd
STATUS_INTERVAL = 5.0
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, signal.SIGHUP,
           signal.SIGUSR1)
# bytes of a boot error's message sent to the master (one atomic pipe write)
BOOT_MESSAGE_MAX = 1024


def respawn_delay(deaths: int) -> float:
    """Seconds before a worker's next start, given its deaths within CRASH_WINDOW."""
    if deaths <= 1:
        return 0.0
    return min(RESPAWN_DELAY_MAX, RESPAWN_DELAY * 2 ** (deaths - 2))


def describe_exit(status: int) -> tuple[int, str]:
    """(exit code or -signal number, words) of a ``waitpid`` status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return -sig, f"killed by {signal.Signals(sig).name}"
    code = os.WEXITSTATUS(status)
    return code, f"exited with code {code}"


class Supervised:
    """What the master knows of one worker index."""

    def __init__(self) -> None:
        self.deaths: deque[float] = deque()   # monotonic times within CRASH_WINDOW
        self.restarts = 0
        self.last_exit = 0
        self.respawn_at = 0.0                  # monotonic; 0: start at once


class Arbiter:
    """A daemon's master: forks the workers and keeps them running, stops the service on a failed
    boot or a crash loop, relays signals, feeds systemd's watchdog and serves the metrics page."""

    def __init__(self, prog: str, label: str, n_workers: int, seg: Segment,
                 factory: Callable[[int, int], WorkerProcess], cpus: list[int],
                 status: Callable[[], str] | None = None,
                 reload: Callable[[], None] | None = None,
                 pages: PageServer | None = None,
                 tick: Callable[[], object] | None = None,
                 reopen: Callable[[], None] | None = None,
                 pool: Pool | None = None) -> None:
        """``factory(index, cpu)`` builds a worker in the master, before the fork;
        ``status()`` gives systemd's STATUS line, ``reload()`` applies a SIGHUP; ``pages``
        (metrics_listen) is served from the master's loop; ``tick()`` runs at every turn
        of it (at least once a second); ``reopen()`` with the log files (SIGUSR1);
        ``pool``: a pool that grows and shrinks (only the indexes it wants run)."""
        self.prog = prog
        self.label = label
        self.n_workers = n_workers
        self.seg = seg
        self.factory = factory
        self.cpus = cpus
        self.workers: dict[int, int] = {}       # pid -> worker index
        self.started: dict[int, float] = {}     # pid -> start time (wall clock)
        self.booted: set[int] = set()           # pids seen writing their own heartbeat
        self.boot_timed_out: set[int] = set()
        self.supervised = [Supervised() for _ in range(n_workers)]
        self.signals: list[int] = []
        self.stopping: str | None = None
        self.exit_code = 0
        self.reason = ""
        self._pipe_r, self._pipe_w = os.pipe()
        self._boot_r, self._boot_w = os.pipe()  # boot errors, one line per failed worker
        self._boot_errors: dict[int, tuple[int, str]] = {}
        self.status = status
        self.reload = reload
        self.pages = pages
        self.tick = tick
        self.reopen = reopen
        self.pool = pool
        self.notifier = Notifier()
        self.ready = False
        self._next_status = 0.0

    # ---------------------------------------------------------------- main loop
    def run(self) -> int:
        setproctitle(f"{self.prog}: master [{self.label}]")
        if self.seg.not_shared:
            log.warning("%s: %s", self.seg.path, self.seg.not_shared)
        for fd in (self._pipe_r, self._pipe_w, self._boot_r):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._pipe_w)
        for sig in HANDLED:
            signal.signal(sig, self._queue_signal)
        # a stop asked for while the daemon was starting (see catch_early_signals)
        self.signals.extend(EARLY_SIGNALS)
        EARLY_SIGNALS.clear()
        if not self.signals:
            for i in range(self.n_workers):
                if self.wanted(i):
                    self.spawn(i)
        while True:
            self.wait(self._timeout())
            while self.signals:
                self.dispatch(self.signals.pop(0))
            self.reap()
            if self.tick is not None:
                self.tick()
            if self.pool is not None and not self.stopping:
                pids = {index: pid for pid, index in self.workers.items()}
                for index in self.pool.step(time.monotonic(), pids):
                    self.spawn(index)
            if self.stopping:
                self.notifier.send("STOPPING=1")
                return self.finish()
            self.murder_stale()
            self.spawn_missing()
            self.tell_systemd()

    def _timeout(self) -> float:
        """Until the next signal, or the next due start of a worker (at most 1 s)."""
        now = time.monotonic()
        alive = set(self.workers.values())
        due = [sup.respawn_at for i, sup in enumerate(self.supervised)
               if i not in alive and self.wanted(i)]
        return max(0.0, min([1.0, *(at - now for at in due)]))

    def tell_systemd(self) -> None:
        now = time.monotonic()
        serving = self.all_serving()
        if not self.ready and serving:
            self.ready = True
            log.info("ready: %d worker(s) serving", len(self.workers))
            self.notifier.send("READY=1", f"STATUS={self._status()}")
            self._next_status = now + STATUS_INTERVAL
        elif self.ready and now >= self._next_status:
            self._next_status = now + STATUS_INTERVAL
            self.notifier.send(f"STATUS={self._status()}")
        if serving:
            self.notifier.feed_watchdog()

    def _status(self) -> str:
        head = f"{len(self.workers)}/{self.n_workers} workers" if self.pool is None else \
            f"workers: {self.pool.describe()}"
        return f"{head}; {self.status()}" if self.status else head

    def wanted(self, index: int) -> bool:
        """Whether a worker should run at ``index`` (all of them, but in a pool that
        grows and shrinks)."""
        return self.pool is None or self.pool.wanted(index)

    def all_serving(self) -> bool:
        """Every worker is up, booted, and its heartbeat is fresh."""
        alive = set(self.workers.values())
        if any(self.wanted(i) and i not in alive for i in range(self.n_workers)):
            return False
        now = time.time()
        for pid, index in self.workers.items():
            try:
                rec = self.seg.read_worker(index)
            except seqlock.TornRead:
                return False
            if rec.pid != pid or now - rec.heartbeat > HEALTHY_HEARTBEAT:
                return False
        return True

    def _queue_signal(self, sig: int, _frame: object) -> None:
        self.signals.append(sig)

    def wait(self, timeout: float) -> None:
        if self.signals:
            return
        pages = self.pages
        readers = [self._pipe_r, *(pages.readers() if pages else ())]
        try:
            ready, writable, _ = select.select(readers, pages.writers() if pages else [], [],
                                               timeout)
        except InterruptedError:
            return
        if pages:
            pages.on_ready({*ready, *writable})
        if self._pipe_r in ready:
            try:
                while os.read(self._pipe_r, 4096):
                    pass
            except BlockingIOError:
                pass

    # ---------------------------------------------------------------- signals
    def dispatch(self, sig: int) -> None:
        name = signal.Signals(sig).name[3:].lower()     # SIGTERM -> term
        handler = getattr(self, f"handle_{name}", None)
        if handler is not None:
            handler()

    def handle_chld(self) -> None:
        """Children are reaped by the main loop after every wake-up."""

    def handle_hup(self) -> None:
        if self.reload and not self.stopping:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={usec}")
            self.reload()
            self.notifier.send("READY=1")

    def handle_usr1(self) -> None:
        logs.reopen()
        if self.reopen is not None:
            self.reopen()
        for pid in self.workers:
            _kill(pid, signal.SIGUSR1)
        log.info("SIGUSR1: log files reopened (master and %d worker(s))", len(self.workers))

    def handle_term(self) -> None:
        self._stop("graceful", "SIGTERM")

    def handle_int(self) -> None:
        self._stop("fast", "SIGINT")

    def handle_quit(self) -> None:
        self._stop("fast", "SIGQUIT")

    def _stop(self, how: str, why: str) -> None:
        if self.stopping:
            if how == "fast":
                self.stopping = "fast"
            return
        self.stopping = how
        log.info("%s: stopping (%s)", why, how)

    def halt(self, reason: str, code: int) -> None:
        """Stop the service because it cannot serve; ``finish()`` logs the reason."""
        if not self.stopping:
            self.reason, self.exit_code, self.stopping = reason, code, "fast"

    # ---------------------------------------------------------------- workers
    def spawn(self, index: int) -> None:
        cpu = self.cpus[index % len(self.cpus)]
        worker = self.factory(index, cpu)      # built here, before the fork
        pid = os.fork()
        if pid == 0:
            os._exit(self._child(worker))
        self.workers[pid] = index
        self.started[pid] = time.time()
        log.info("worker %d/%d started: pid %d, cpu %d", index + 1, self.n_workers, pid, cpu)

    def _child(self, worker: WorkerProcess) -> int:
        """The forked child: drop the master's machinery, boot the worker, run it."""
        try:
            signal.set_wakeup_fd(-1)
            for sig in HANDLED:
                signal.signal(sig, signal.SIG_DFL)
            self.notifier.close()
            if self.pages:
                self.pages.close()
            for fd in (self._pipe_r, self._pipe_w, self._boot_r):
                os.close(fd)
            try:
                worker.init_process()
            except BaseException as e:   # noqa: BLE001 - every failure here is a boot error
                self._report_boot_error(worker, e)
                return WORKER_BOOT_ERROR
            try:
                worker.run()
            except SystemExit as e:
                return e.code if isinstance(e.code, int) else EXIT_FAILURE
            except BaseException:        # noqa: BLE001 - logged; the master starts another
                log.exception("worker %d crashed", worker.index + 1)
                return EXIT_FAILURE
            return 0
        finally:
            logging.shutdown()

    def _report_boot_error(self, worker: WorkerProcess, e: BaseException) -> None:
        if isinstance(e, BootError):
            code, message = e.code, str(e)
            log.error("worker %d cannot start: %s", worker.index + 1, message)
        else:
            code, message = EXIT_FAILURE, f"{type(e).__name__}: {e}"
            log.error("worker %d cannot start: %s", worker.index + 1, message,
                      exc_info=not isinstance(e, SystemExit | KeyboardInterrupt))
        line = f"{worker.index}\t{code}\t{message}".replace("\n", " ")
        try:
            os.write(self._boot_w, line.encode()[:BOOT_MESSAGE_MAX] + b"\n")
        except OSError:
            pass  # the master still sees the exit code

    def _read_boot_errors(self) -> None:
        try:
            data = os.read(self._boot_r, 65536)
        except BlockingIOError:
            return
        for line in data.decode(errors="replace").splitlines():
            index, code, message = (line.split("\t", 2) + ["", ""])[:3]
            if index.isdigit():
                self._boot_errors[int(index)] = (int(code) if code.isdigit() else EXIT_FAILURE,
                                                 message)

    def spawn_missing(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        alive = set(self.workers.values())
        for i, sup in enumerate(self.supervised):
            if i not in alive and now >= sup.respawn_at and self.wanted(i):
                sup.restarts += 1
                sup.respawn_at = 0.0
                self._publish(i)
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
            booted = pid in self.booted
            self.booted.discard(pid)
            if index is None:
                continue  # not ours
            code, why = describe_exit(status)
            if self.stopping:
                log.info("worker %d (pid %d) %s", index + 1, pid, why)
                continue
            if self.pool is not None and index in self.pool.retiring:
                self.pool.retired(index, code, why)
                continue
            if code == WORKER_BOOT_ERROR or pid in self.boot_timed_out:
                self.boot_timed_out.discard(pid)
                self._read_boot_errors()
                exit_code, message = self._boot_errors.get(
                    index, (EXIT_FAILURE, "it did not boot" if code != WORKER_BOOT_ERROR
                            else "see its log"))
                log.error("worker %d (pid %d) could not start: %s", index + 1, pid, message)
                self.halt(f"worker {index + 1} could not start: {message}", exit_code)
                continue
            self._died(index, pid, code, why, booted)

    def _died(self, index: int, pid: int, code: int, why: str, booted: bool) -> None:
        """A booted (or booting) worker died: start another, later each time; a crash loop
        stops the service."""
        sup = self.supervised[index]
        now = time.monotonic()
        sup.deaths.append(now)
        while sup.deaths and sup.deaths[0] < now - CRASH_WINDOW:
            sup.deaths.popleft()
        sup.last_exit = code
        deaths = len(sup.deaths)
        if code == -signal.SIGKILL:
            why += " (out of memory?)"
        if deaths >= CRASH_LOOP_DEATHS:
            self._publish(index)
            log.error("worker %d (pid %d) %s: %d deaths within %gs, a crash loop", index + 1,
                      pid, why, deaths, CRASH_WINDOW)
            self.halt(f"worker {index + 1} died {deaths} times within {CRASH_WINDOW:g}s "
                      f"(crash loop; last: {why})", EXIT_FAILURE)
            return
        delay = respawn_delay(deaths)
        sup.respawn_at = now + delay
        self._publish(index)
        log.warning("worker %d (pid %d) %s%s; starting a new one%s", index + 1, pid, why,
                    "" if booted else " before it served",
                    f" in {delay:g}s ({deaths} deaths within {CRASH_WINDOW:g}s)" if delay
                    else "")

    def _publish(self, index: int) -> None:
        """The supervision record of worker ``index``, for tcpcopyctl status."""
        sup = self.supervised[index]
        wait = sup.respawn_at - time.monotonic() if sup.respawn_at else 0.0
        self.seg.write_supervision(index, sup.restarts, len(sup.deaths), sup.last_exit,
                                   time.time() + wait if wait > 0 else 0.0,
                                   self.pool.places[index] if self.pool else POOL_ALONE)

    def murder_stale(self) -> None:
        """Kill booted workers whose heartbeat stopped, and workers that never boot."""
        now = time.time()
        for pid, index in list(self.workers.items()):
            started = self.started.get(pid, now)
            try:
                rec = self.seg.read_worker(index)
            except seqlock.TornRead:
                continue  # stopped in the middle of a write: judged on the next round
            if rec.pid == pid:
                self.booted.add(pid)
                if now - max(rec.heartbeat, started) > HEARTBEAT_TIMEOUT:
                    log.warning("worker %d (pid %d) silent for %.0fs: killing it", index + 1,
                                pid, now - rec.heartbeat)
                    _kill(pid, signal.SIGKILL)
            elif now - started > BOOT_TIMEOUT and pid not in self.boot_timed_out:
                log.error("worker %d (pid %d) did not boot within %gs: killing it",
                          index + 1, pid, BOOT_TIMEOUT)
                self.boot_timed_out.add(pid)
                _kill(pid, signal.SIGKILL)

    def finish(self) -> int:
        if self.pages:
            self.pages.close()
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
