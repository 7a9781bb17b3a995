"""The arbiter with stand-in workers: a worker that cannot boot stops the service."""
import logging
import multiprocessing as mp
import os
import signal
import sys
import time

from shm import segment as shmseg
from tcpcopyd.service.arbiter import Arbiter
from tcpcopyd.service.startup import catch_early_signals
from tcpcopyd.service.worker import WorkerProcess


class FailingWorker(WorkerProcess):
    title = "test: worker"

    def __init__(self, index: int, seg, spawn_log: str) -> None:
        super().__init__(index, 2, 0, seg)
        self.spawn_log = spawn_log

    def setup(self) -> None:
        fd = os.open(self.spawn_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, b"x")  # one byte per worker started (no lock a killed child could hold)
        os.close(fd)
        sys.exit(1)


def _run_arbiter(name: str, spawn_log: str, early_stop: bool = False) -> None:
    if early_stop:
        catch_early_signals()
        os.kill(os.getpid(), signal.SIGTERM)   # as if systemd stopped us while starting
    seg = shmseg.create(name, 1, 2, 0, 64)

    def factory(index: int, cpu: int) -> WorkerProcess:
        return FailingWorker(index, seg, spawn_log)

    try:
        code = Arbiter("test", "unit", 2, seg, factory, [0]).run()
    finally:
        seg.close()
        seg.unlink()
    os._exit(code)


def test_a_worker_that_cannot_boot_stops_the_service_instead_of_fork_looping(tmp_path):
    spawn_log = str(tmp_path / "spawned")
    p = mp.get_context("fork").Process(
        target=_run_arbiter, args=(f"tcpcopyd-test-arb-{os.getpid()}", spawn_log))
    t0 = time.monotonic()
    p.start()
    p.join(20)
    assert p.exitcode == 1
    assert time.monotonic() - t0 < 10
    with open(spawn_log, "rb") as f:
        assert 1 <= len(f.read()) <= 4  # the two workers, perhaps once more each: no loop


def test_a_stop_during_start_up_is_kept_for_the_arbiter_which_cleans_up(tmp_path):
    spawn_log = str(tmp_path / "spawned")
    name = f"tcpcopyd-test-early-{os.getpid()}"
    p = mp.get_context("fork").Process(target=_run_arbiter, args=(name, spawn_log, True))
    p.start()
    p.join(20)
    assert p.exitcode == 0                    # not killed by the signal
    assert not os.path.exists(spawn_log)      # no worker started
    assert name not in shmseg.list_segments("tcpcopyd-test-early")   # segment removed


def test_a_worker_that_does_not_keep_up_says_so_once_a_minute_with_the_way_out(caplog):
    w = FailingWorker(0, None, "")
    w.n_workers, w.cpus_allowed = 1, 16
    with caplog.at_level(logging.WARNING, "worker"):
        w.falling_behind(0, "packets dropped", "workers", 100.0)
        assert caplog.text == ""                      # nothing lost: nothing said
        w.falling_behind(40, "packets dropped", "workers", 100.0)
        w.falling_behind(2, "packets dropped", "workers", 130.0)
        w.falling_behind(3, "packets dropped", "workers", 160.1)
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "worker 1/1 does not keep up: 40 packets dropped; workers = 2 shares the load "
        "among more workers (this host lets it use 16 CPUs)",
        "worker 1/1 does not keep up: 5 packets dropped; workers = 2 shares the load "
        "among more workers (this host lets it use 16 CPUs)"]
    caplog.clear()
    w.n_workers = w.cpus_allowed = 2
    with caplog.at_level(logging.WARNING, "worker"):
        w.falling_behind(7, "packets dropped", "queues", 300.0)
    assert caplog.records[0].getMessage() == (
        "worker 1/2 does not keep up: 7 packets dropped; every CPU it may use has a worker "
        "already (queues = 2): the load is beyond this host")
