"""The arbiter's boot protocol with stand-in workers in real forked processes: a boot error
stops the service with the worker's message and exit code; a crash after booting is answered
with a new worker, later each time; a crash loop stops the service; the watchdog is fed only
while every worker serves; signals reach handle_<name>()."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import struct
import time

import pytest

from shm import segment as shmseg
from tcpcopyd.service import arbiter as arb
from tcpcopyd.service.arbiter import Arbiter, respawn_delay
from tcpcopyd.service.worker import BootError, WorkerProcess


class StandIn(WorkerProcess):
    """``setup`` and ``run`` do what the test asks; every start is logged with its time."""

    title = "test: worker"

    def __init__(self, index: int, seg, log: str, boot_error: BootError | None = None,
                 crash_after: float | None = None, crashing: int = -1) -> None:
        super().__init__(index, seg.n_workers, 0, seg)
        self.log, self.boot_error = log, boot_error
        self.crash_after, self.crashing = crash_after, crashing

    def setup(self) -> None:
        with open(self.log, "a") as f:
            f.write(f"{self.index} {time.monotonic()}\n")
        if self.boot_error is not None and self.index == self.crashing:
            raise self.boot_error

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop:
            self.heartbeat()
            if self.crash_after is not None and self.index == self.crashing \
                    and time.monotonic() - t0 > self.crash_after:
                raise RuntimeError("stand-in crash")
            time.sleep(0.02)


def run_arbiter(tmp_path, n: int = 2, stop_after: float | None = None, **kw) -> tuple[int, str,
                                                                                       list]:
    """Runs an arbiter of ``n`` stand-in workers in a child; returns (exit code, its log,
    [(worker index, monotonic start time)])."""
    name = f"test-boot-{os.getpid()}-{time.monotonic_ns()}"
    starts, logfile = str(tmp_path / "starts"), str(tmp_path / "log")

    def main() -> None:
        import logging
        logging.basicConfig(filename=logfile, level=logging.INFO, force=True)
        seg = shmseg.create(name, 1, n, 0, 64)
        a = Arbiter("test", "unit", n, seg,
                    lambda i, _cpu: StandIn(i, seg, starts, **kw), [0])
        if stop_after is not None:
            signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
            signal.setitimer(signal.ITIMER_REAL, stop_after)
        try:
            code = a.run()
        finally:
            seg.close()
            seg.unlink()
        logging.shutdown()
        os._exit(code)

    p = mp.get_context("fork").Process(target=main)
    p.start()
    p.join(60)
    assert p.exitcode is not None, "the arbiter did not stop"
    with open(starts) as f:
        started = [(int(i), float(t)) for i, t in (line.split() for line in f)]
    with open(logfile) as f:
        return p.exitcode, f.read(), started


def test_a_boot_error_stops_the_service_with_its_message_and_exit_code(tmp_path):
    code, log, started = run_arbiter(tmp_path, boot_error=BootError("no such queue 7", 78),
                                     crashing=1)
    assert code == 78
    assert "worker 2 could not start: no such queue 7" in log
    assert [i for i, _ in started].count(1) == 1       # never started again


def test_any_exception_while_booting_is_a_boot_error(tmp_path):
    code, log, started = run_arbiter(tmp_path, boot_error=ValueError("bad slot"), crashing=0)
    assert code == 1
    assert "worker 1 could not start: ValueError: bad slot" in log
    assert [i for i, _ in started].count(0) == 1


def test_a_crash_after_booting_is_answered_later_each_time_and_a_crash_loop_fails(tmp_path):
    t0 = time.monotonic()
    code, log, started = run_arbiter(tmp_path, crash_after=0.05, crashing=1)
    assert code == 1
    assert f"worker 2 died {arb.CRASH_LOOP_DEATHS} times within" in log and "crash loop" in log
    starts = [t for i, t in started if i == 1]
    assert len(starts) == arb.CRASH_LOOP_DEATHS
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    # each start waits for the death before it, then the backoff: 0, 0.25, 0.5, 1.0 s
    for k, gap in enumerate(gaps, start=1):
        assert gap >= respawn_delay(k), gaps
    assert gaps[-1] > gaps[0] + 0.5
    assert time.monotonic() - t0 < arb.CRASH_WINDOW + 10
    assert [i for i, _ in started].count(0) == 1        # the healthy worker ran on


def test_a_worker_that_dies_now_and_then_is_started_again_and_the_service_goes_on(tmp_path):
    code, log, started = run_arbiter(tmp_path, stop_after=3.0, crash_after=1.0, crashing=0)
    assert code == 0                                    # stopped by SIGTERM, no crash loop
    assert 2 <= [i for i, _ in started].count(0) <= 4
    assert "starting a new one" in log and "crash loop" not in log


def test_respawn_delay_doubles_and_is_bounded():
    assert [respawn_delay(k) for k in range(1, 6)] == [0.0, 0.25, 0.5, 1.0, 2.0]
    assert respawn_delay(50) == arb.RESPAWN_DELAY_MAX


@pytest.fixture
def notify(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    sd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sd.bind(path)
    sd.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2")      # feed at every chance
    monkeypatch.delenv("WATCHDOG_PID", raising=False)

    def received() -> list[bytes]:
        out = []
        while True:
            try:
                out.append(sd.recv(4096))
            except BlockingIOError:
                return out
    yield received
    sd.close()


def test_the_watchdog_is_fed_only_while_every_worker_serves(notify):
    seg = shmseg.create(f"test-wd-{os.getpid()}", 1, 2, 0, 64)
    try:
        a = Arbiter("test", "unit", 2, seg, lambda i, c: None, [0])  # type: ignore[arg-type]
        me = os.getpid()
        a.workers = {me: 0}                   # worker 2 is missing (waiting to start again)
        seg.write_worker(0, me, 0, time.time(), [])
        a.tell_systemd()
        assert notify() == []
        a.workers = {me: 0, me + 1: 1}        # both there, worker 2 has not booted
        a.tell_systemd()
        assert notify() == []
        seg.write_worker(1, me + 1, 0, time.time(), [])
        a.tell_systemd()
        got = notify()
        assert got[0].startswith(b"READY=1") and b"WATCHDOG=1" in got
        # a stale heartbeat is not healthy
        off = seg.workers_off + 1 * shmseg.WORKER_SIZE + 4 + shmseg.WORKER.offset("heartbeat")
        struct.pack_into("<d", seg.mm, off, time.time() - 60)
        a.tell_systemd()
        assert b"WATCHDOG=1" not in notify()
    finally:
        seg.close()
        seg.unlink()


def test_signals_are_dispatched_to_handle_methods():
    seg = shmseg.create(f"test-sig-{os.getpid()}", 1, 1, 0, 64)
    try:
        reloaded = []
        a = Arbiter("test", "unit", 1, seg, lambda i, c: None, [0],  # type: ignore[arg-type]
                    reload=lambda: reloaded.append(1))
        a.dispatch(signal.SIGHUP)
        assert reloaded == [1]
        a.dispatch(signal.SIGTERM)
        assert a.stopping == "graceful"
        a.dispatch(signal.SIGQUIT)
        assert a.stopping == "fast"
        a.dispatch(signal.SIGWINCH)           # no handler: ignored
    finally:
        seg.close()
        seg.unlink()


def test_a_new_worker_goes_on_from_the_counters_of_the_one_it_replaces(tmp_path):
    seg = shmseg.create(f"test-carry-{os.getpid()}", 1, 1, 0, 64)
    try:
        seg.write_worker(0, 1234, 0, 0.0, [5, 7])
        w = StandIn(0, seg, str(tmp_path / "starts"))
        w.counters = [1, 0, 0]
        w.carry_counters()
        assert w.counters == [6, 7, 0]
    finally:
        seg.close()
        seg.unlink()
