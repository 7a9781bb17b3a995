"""`tcpcopyd`: the online-host daemon (entry point)."""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from shm import segment as shmseg
from tcpcopyd import capture, options
from tcpcopyd.arbiter import (
    WORKER_BOOT_ERROR,
    Arbiter,
    allowed_cpus,
    remove_pidfile,
    setup_logging,
    write_pidfile,
)
from tcpcopyd.sender import SendError, open_raw_socket
from tcpcopyd.session import SLOT_SIZE
from tcpcopyd.settings import parse_args

PROG = "tcpcopyd"
# shm segment kind
KIND = 1

log = logging.getLogger(PROG)


def fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(PROG, "Copy live TCP traffic to a target server (online-host side).",
                     options.REGISTRY, argv, "tcpcopyd")
    if os.geteuid() != 0:
        return fail("needs root (AF_PACKET capture and raw sockets): run it with sudo or as "
                    "the systemd unit")
    err = options.check_interface(cfg.interface)
    if err:
        return fail(err)
    setup_logging(PROG, cfg.log, cfg.log_level)
    if cfg.workers is None:
        cfg.values["workers"] = len(allowed_cpus())
    try:
        open_raw_socket().close()
    except SendError as e:
        return fail(str(e))
    instance = cfg.instance or f"tcpcopyd.{cfg.interface}"
    ports = [t.port for t in cfg.transfer]
    group = os.getpid() & 0xFFFF
    sockets = []
    try:
        for _ in range(cfg.workers):
            sockets.append(capture.open_capture(cfg.interface, ports, group))
    except capture.CaptureError as e:
        for s in sockets:
            s.close()
        return fail(str(e))
    try:
        seg = shmseg.create(instance, KIND, cfg.workers, cfg.session_slots, SLOT_SIZE,
                            label=cfg.interface)
    except (shmseg.SegmentError, OSError) as e:
        return fail(f"shared memory: {e}")
    write_pidfile(cfg.pidfile)
    log.info("tcpcopyd %s on %s -> interceptd %s; %d worker(s), shm %s", _version(),
             cfg.interface, ",".join(f"{h}:{p}" for h, p in cfg.server), cfg.workers,
             seg.path)

    def boot(index: int, cpu: int) -> None:
        from tcpcopyd.worker import Worker
        for i, s in enumerate(sockets):
            if i != index:
                s.close()
        try:
            w = Worker(cfg, index, cpu, seg, sockets[index])
        except Exception as e:  # noqa: BLE001 - reported, then the master stops
            log.error("worker %d cannot start: %s", index + 1, e)
            sys.exit(WORKER_BOOT_ERROR)
        w.run()

    try:
        return Arbiter(PROG, cfg.interface, cfg.workers, seg, boot, allowed_cpus()).run()
    finally:
        for s in sockets:
            s.close()
        seg.close()
        seg.unlink()
        remove_pidfile(cfg.pidfile)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("tcpcopyd")
    except PackageNotFoundError:
        return "dev"


if __name__ == "__main__":
    sys.exit(main())
