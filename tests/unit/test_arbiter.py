"""The arbiter with stand-in workers: a worker that cannot boot stops the service."""
import multiprocessing as mp
import os
import sys
import time

from shm import segment as shmseg
from tcpcopyd.arbiter import WORKER_BOOT_ERROR, Arbiter


def _run_arbiter(name: str, spawned) -> None:
    seg = shmseg.create(name, 1, 2, 0, 64)

    def boot(index: int, cpu: int) -> None:
        with spawned.get_lock():
            spawned.value += 1
        sys.exit(WORKER_BOOT_ERROR)

    try:
        code = Arbiter("test", "unit", 2, seg, boot, [0]).run()
    finally:
        seg.close()
        seg.unlink()
    os._exit(code)


def test_a_worker_that_cannot_boot_stops_the_service_instead_of_fork_looping():
    ctx = mp.get_context("fork")
    spawned = ctx.Value("i", 0)
    p = ctx.Process(target=_run_arbiter, args=(f"tcpcopyd-test-arb-{os.getpid()}", spawned))
    t0 = time.monotonic()
    p.start()
    p.join(20)
    assert p.exitcode == 1
    assert time.monotonic() - t0 < 10
    assert spawned.value <= 4  # the two workers, perhaps once more each: no loop
