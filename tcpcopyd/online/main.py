"""`tcpcopyd`: the online-host daemon (entry point)."""
from __future__ import annotations

import errno
import logging
import os
import re
import sys
from collections.abc import Sequence

from shm import segment as shmseg
from tcpcopyd import native
from tcpcopyd.health import metrics
from tcpcopyd.net import capture, netlink
from tcpcopyd.net.sender import SendError, open_raw_socket
from tcpcopyd.online import comparelog, options, strays
from tcpcopyd.online import counters as C
from tcpcopyd.online.options import Settings
from tcpcopyd.online.session import SLOT_SIZE
from tcpcopyd.online.worker import CaptureWorker, captured
from tcpcopyd.service import capabilities, logs
from tcpcopyd.service.arbiter import Arbiter
from tcpcopyd.service.instance import InstanceError, InstanceLock
from tcpcopyd.service.pool import Policy, Pool
from tcpcopyd.service.reload import Reloader, StatusLine
from tcpcopyd.service.settings import (
    EX_CONFIG,
    EX_USAGE,
    ConfigError,
    load_secret,
    parse_args,
    version,
)
from tcpcopyd.service.startup import (
    allowed_cpus,
    catch_early_signals,
    remove_pidfile,
    unsupported_machine,
    write_pidfile,
)
from tcpcopyd.service.startup import fail as _fail

PROG = "tcpcopyd"
# the most session slots of a pool that grows and shrinks, all workers' parts together
MAX_SLOTS = 1 << 24

log = logging.getLogger(PROG)


DESCRIPTION = "Copy live TCP traffic to a target server (online-host side)."


def fail(message: str, code: int = 1) -> int:
    return _fail(PROG, message, code)


def not_live(old: Settings, new: Settings) -> list[str]:
    """A reload may send the same ports to new targets and bind them to other online
    addresses (the pods of a node come and go), not capture other ports, nor a family
    the capture sockets do not take (the first IPv6 rule)."""
    same = ({t.port for t in old.transfer} == {t.port for t in new.transfer}
            and any(t.ipv6 for t in old.transfer) == any(t.ipv6 for t in new.transfer))
    return [] if same else ["transfer"]


def capture_file_error(path: str) -> str | None:
    """-i with a '/' names a capture file to replay: it must be one."""
    if not os.path.isfile(path):
        return f"-i {path}: no such capture file (an interface name has no '/')"
    return None


def interface_error(name: str) -> str | None:
    """-i without a '/' names an interface, never a file: a missing interface is an
    error, with a hint if a file of that name is at hand. A set of them (a list, a
    pattern) may match none yet: it is followed as interfaces come and go."""
    if netlink.is_interface_set(name):
        if not [p for p in name.split(",") if p.strip()]:
            return f"-i {name!r}: no interface in the list"
        return None
    err = capture.check_interface(name)
    if err and os.path.isfile(name):
        err += f"; to replay the capture file {name!r} instead, give -i ./{name}"
    return err


def replay(cfg: Settings) -> int:
    """`-i ./FILE`: replay a capture file offline, in this process."""
    from tcpcopyd.net.pcapfile import CaptureFileError
    from tcpcopyd.online.replay import Replay
    try:
        open_raw_socket().close()
        idle_cut = None if cfg.idle_cut is None else cfg.idle_cut / 1000
        return Replay(cfg, cfg.interface).run(cfg.accelerate, idle_cut, cfg.repeat)
    except SendError as e:
        return fail(str(e))
    except CaptureFileError as e:
        return fail(f"{cfg.interface}: {e}", EX_CONFIG)
    except ImportError as e:
        return fail(f"offline replay needs dpkt ({e}): apt install python3-dpkt")


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(PROG, DESCRIPTION, options.REGISTRY, argv, options.LAYOUT)
    try:
        load_secret(cfg)
    except ConfigError as e:
        return fail(str(e), e.code)
    catch_early_signals()
    why = unsupported_machine()
    if why:
        return fail(why, EX_CONFIG)
    missing = capabilities.missing(("CAP_NET_RAW",))
    if missing:
        return fail(f"needs {', '.join(missing)} (AF_PACKET capture and raw sockets): run it "
                    "as root, with sudo or as the systemd unit")
    offline = "/" in cfg.interface
    replay_only = [name for name in ("accelerate", "idle_cut", "repeat")
                   if cfg.source.get(name) and not offline]
    if replay_only:
        return fail(f"{', '.join(replay_only)} only apply to an offline replay "
                    "(-i ./FILE.pcap)", EX_USAGE)
    err = capture_file_error(cfg.interface) if offline else interface_error(cfg.interface)
    if err:
        return fail(err, EX_CONFIG)
    try:
        logs.setup(PROG, cfg.log, cfg.log_level)
    except OSError as e:
        return fail(f"cannot open log file {cfg.log}: {e.strerror}", EX_CONFIG)
    if offline:
        return replay(cfg)
    try:
        open_raw_socket().close()
    except SendError as e:
        return fail(str(e))
    # a set's pattern in a name: its marks and commas as "_" (tcpcopyd.veth_)
    instance = cfg.instance or "tcpcopyd." + re.sub(r"[^A-Za-z0-9._@+-]", "_",
                                                     cfg.interface)[:54]
    try:
        lock = InstanceLock(instance).acquire()
    except InstanceError as e:
        return fail(str(e))
    try:
        return online(cfg, instance)
    finally:
        lock.release()


class Captures:
    """The workers' capture sockets (one fanout group), and with the comparison test as
    many for the online server's answers (a group of their own: a connection's answers
    reach the worker that has its requests, the kernel's flow hash being symmetric). A
    pool that grows and shrinks opens a worker's sockets when it joins and closes the
    master's descriptors of them when it retires (None: not open)."""

    def __init__(self, cfg: Settings, workers: int) -> None:
        self.cfg = cfg
        self.ports, self.ipv6 = captured(cfg)
        self.group = os.getpid() & 0xFFFF
        self.sockets: list = [None] * workers
        self.answers: list = [None] * workers if cfg.compare else []

    def open(self, index: int) -> None:
        cfg = self.cfg
        # a set of interfaces: those it matches now (the workers follow the rest)
        indexes = sorted(netlink.matching(cfg.interface).values()) \
            if netlink.is_interface_set(cfg.interface) else None
        if indexes == [] and index == 0:
            log.warning("-i %s matches no interface yet: capture starts when one appears",
                        cfg.interface)
        self.sockets[index] = capture.open_capture(
            cfg.interface, self.ports, self.group, ring=True, ipv6=self.ipv6,
            promisc=cfg.mirror, interfaces=indexes)
        if cfg.compare:
            self.answers[index] = capture.open_capture(
                cfg.interface, self.ports, (self.group + 1) & 0xFFFF, answers=True,
                ipv6=self.ipv6, interfaces=indexes)

    def close(self, index: int) -> None:
        for group in (self.sockets, self.answers):
            if group and group[index] is not None:
                group[index].close()
                group[index] = None

    def close_all(self) -> None:
        for index in range(len(self.sockets)):
            self.close(index)


def pool_size(cfg: Settings, cpus: int) -> int:
    """The most workers: workers, or with auto one per CPU this process may use."""
    if cfg.workers != options.AUTO_WORKERS:
        return cfg.workers
    return max(1, min(cpus, 1024))


def create_segment(cfg: Settings, instance: str, workers: int, pooled: bool
                   ) -> shmseg.Segment:
    """The instance's shm segment. A pool that grows and shrinks gives each worker room for
    session_slots sessions (one alone holds all of them; the table's pages are only used
    where sessions are written), and a key table of their sessions."""
    slots = min(cfg.session_slots * workers, MAX_SLOTS) if pooled else cfg.session_slots
    return shmseg.create(instance, C.KIND, workers, slots, SLOT_SIZE, label=cfg.interface,
                         extra_size=strays.table_size(workers, slots) if pooled else 0)


def pool_of(cfg: Settings, seg: shmseg.Segment, caps: Captures) -> Pool:
    """The master's side of a pool that grows and shrinks (workers = auto)."""
    policy = Policy(1, seg.n_workers, cfg.grow_at / 100, cfg.shrink_at / 100,
                    cfg.shrink_after)
    return Pool(seg, policy, caps.open, caps.close, cfg.max_lag, C.INDEX)


def online(cfg: Settings, instance: str) -> int:
    """Capture on the interface, with the instance taken: the workers and their master."""
    auto = cfg.workers == options.AUTO_WORKERS
    workers = pool_size(cfg, len(allowed_cpus()))
    caps = Captures(cfg, workers)
    try:
        for index in range(1 if auto else workers):
            caps.open(index)
    except capture.CaptureError as e:
        caps.close_all()
        return fail(str(e))
    pooled = auto and workers > 1
    try:
        seg = create_segment(cfg, instance, workers, pooled)
    except (shmseg.SegmentError, OSError) as e:
        caps.close_all()
        return fail(f"shared memory: {e}")
    clog = None
    # the comparison test's records: shared with the workers only, never with the segment
    rings = comparelog.Rings(workers) if cfg.compare else None
    # a pool that grows and shrinks: the workers' inboxes of packets handed over
    inboxes = strays.Inboxes(workers) if pooled else None
    pool = pool_of(cfg, seg, caps) if pooled else None

    def factory(index: int, cpu: int) -> CaptureWorker:
        return CaptureWorker(cfg, index, cpu, seg, caps.sockets, caps.answers, rings,
                             n_workers=workers, inboxes=inboxes, strays_at=seg.extra_off)

    try:
        try:
            pages = metrics.page_server(cfg, seg)
        except ConfigError as e:
            return fail(str(e), e.code)
        if cfg.compare:
            try:
                clog = comparelog.CompareLog(cfg.compare_log, rings, cfg.compare_ignore)
            except OSError as e:
                bad = cfg.invalid("compare_log", f"cannot write it: {e.strerror}")
                return fail(str(bad), bad.code)
        try:
            write_pidfile(cfg.pidfile)
        except OSError as e:
            bad = cfg.invalid("pidfile", f"cannot write it: {e.strerror}"
                              + (" (a symbolic link is never followed)"
                                 if e.errno == errno.ELOOP else ""))
            return fail(str(bad), bad.code)
        reload = Reloader(PROG, DESCRIPTION, options.REGISTRY, options.LAYOUT, cfg, seg,
                          not_live)
        reload.publish()
        log.info("tcpcopyd %s (%s) on %s -> interceptd %s; %s, shm %s", version(),
                 native.build(), cfg.interface, ",".join(options.show_servers(cfg.server)),
                 f"a pool of 1 to {workers} workers" if pooled else f"{workers} worker(s)",
                 seg.path)
        status = StatusLine(seg, C.NAMES, ("captured", "sent"),
                            ("sessions_active", "capture_lag_ms", "lag_drops",
                             "kernel_drops"))
        return Arbiter(PROG, cfg.interface, workers, seg, factory, allowed_cpus(),
                       status=status, reload=reload, pages=pages,
                       tick=clog.drain if clog else None,
                       reopen=clog.reopen if clog else None, pool=pool).run()
    finally:
        if clog is not None:
            clog.close()
        caps.close_all()
        if inboxes is not None:
            inboxes.close()
        seg.close()
        seg.unlink()
        remove_pidfile(cfg.pidfile)


if __name__ == "__main__":
    sys.exit(main())
