"""`interceptd`: the target-host daemon (entry point)."""
from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence

from interceptd import budget, rules, shared
from interceptd import counters as C
from interceptd.options import LAYOUT, REGISTRY, Settings
from interceptd.worker import QueueWorker, dispatch
from shm import segment as shmseg
from tcpcopyd.health import metrics
from tcpcopyd.net import capture, wire
from tcpcopyd.service import capabilities, logs
from tcpcopyd.service.addresses import show_host
from tcpcopyd.service.arbiter import Arbiter
from tcpcopyd.service.instance import InstanceError, InstanceLock
from tcpcopyd.service.reload import Reloader, StatusLine
from tcpcopyd.service.settings import EX_CONFIG, ConfigError, load_secret, parse_args, version
from tcpcopyd.service.startup import (
    allowed_cpus,
    catch_early_signals,
    remove_pidfile,
    unsupported_machine,
    write_pidfile,
)
from tcpcopyd.service.startup import fail as _fail

PROG = "interceptd"

log = logging.getLogger(PROG)

# packets the kernel may hold for a queue before dropping them (fail-closed)
QUEUE_MAXLEN = 16384
# bytes of each queued packet copied to us: IPv4 header + the largest TCP header
COPY_RANGE = 60 + 60 + wire.PREFIX_MAX
# NFQUEUE copy mode "packet"
NFQNL_COPY_PACKET = 2


DESCRIPTION = "Intercept the target's replies for tcpcopyd (target-host side)."


def fail(message: str, code: int = 1) -> int:
    return _fail(PROG, message, code)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(PROG, DESCRIPTION, REGISTRY, argv, LAYOUT)
    try:
        load_secret(cfg)
    except ConfigError as e:
        return fail(str(e), e.code)
    catch_early_signals()
    why = unsupported_machine()
    if why:
        return fail(why, EX_CONFIG)
    missing = capabilities.missing(("CAP_NET_ADMIN", "CAP_NET_RAW"))
    if missing:
        return fail(f"needs {', '.join(missing)} (NFQUEUE and iptables): run it as root, "
                    "with sudo or as the systemd unit")
    try:
        logs.setup(PROG, cfg.log, cfg.log_level)
    except OSError as e:
        return fail(f"cannot open log file {cfg.log}: {e.strerror}", EX_CONFIG)
    try:    # every bound at its most must fit the unit's MemoryMax
        budget.fit(cfg, lambda q: shared.extra_size(q, cfg.max_routes), budget.memory_limit())
    except ConfigError as e:
        return fail(str(e), e.code)
    try:
        lock = InstanceLock(cfg.instance).acquire()
    except InstanceError as e:
        return fail(str(e))
    try:
        return assistant(cfg) if cfg.interface else intercept(cfg)
    finally:
        lock.release()


def intercept(cfg: Settings) -> int:
    """NFQUEUE mode, with the instance taken: bind the queues, then serve."""
    try:
        from netfilterqueue import NetfilterQueue
    except ImportError as e:
        return fail(f"NetfilterQueue is not installed ({e}): apt install "
                    "python3-netfilterqueue (built by tools/build-debs) or pip install "
                    "NetfilterQueue")
    # the master binds every queue and keeps the bindings: a worker that dies does not
    # unbind its queue, packets wait in the kernel for its successor
    queues = []
    for q in range(cfg.queue_num, cfg.queue_num + cfg.queues):
        nfq = NetfilterQueue()
        try:
            nfq.bind(q, dispatch, max_len=QUEUE_MAXLEN, mode=NFQNL_COPY_PACKET,
                     range=COPY_RANGE, sock_len=8 << 20)
        except OSError as e:
            for other in queues:
                other.unbind()
            return fail(f"cannot bind NFQUEUE {q}: {e} (is another interceptd using it? "
                        f"choose other numbers with --queue-num)")
        queues.append(nfq)
    return serve(cfg, queues, lambda: [nfq.unbind() for nfq in queues])


def assistant(cfg: Settings) -> int:
    """Assistant mode: the replies come from capture sockets on ``cfg.interface``."""
    err = capture.check_interface(cfg.interface)
    if err:
        return fail(err, EX_CONFIG)
    if forwards() and not cfg.assistant_forwarding_ok:
        return fail("assistant mode on a host that forwards IPv4 or IPv6 "
                    "(net.ipv4.ip_forward=1 or net.ipv6.conf.all.forwarding=1): the "
                    "target's replies would go on to "
                    "the real clients; sysctl -w net.ipv4.ip_forward=0 "
                    "net.ipv6.conf.all.forwarding=0, or --assistant-forwarding-ok if they "
                    "are dropped some other way", EX_CONFIG)
    sockets = []
    try:
        for _ in range(cfg.queues):
            sockets.append(capture.open_capture(cfg.interface, cfg.service_port,
                                                os.getpid() & 0xFFFF, source=True,
                                                ipv6=rules.has_ipv6()))
    except capture.CaptureError as e:
        for sock in sockets:
            sock.close()
        return fail(str(e))
    cfg.no_iptables = True
    return serve(cfg, sockets, lambda: [sock.close() for sock in sockets])


def operator_rules(cfg: Settings, ipv6: bool) -> bool:
    """With ``--no-iptables``, look for the operator's rules: a service port no iptables
    rule queues to our queues is said (its replies would reach the clients unless native
    nftables rules queue them); IPv6 sessions are taken only where ip6tables queues
    every service port (or the operator says their rules are elsewhere). Returns whether
    IPv6 sessions are taken."""
    def missing(v6: bool) -> list[int]:
        try:
            return rules.unqueued_ports(cfg.service_port, cfg.queue_num, cfg.queues, v6)
        except rules.RuleError:
            return list(cfg.service_port)
    queues = f"{cfg.queue_num}..{cfg.queue_num + cfg.queues - 1}"
    bare = missing(False)
    if bare:
        log.warning("no iptables OUTPUT rule queues the replies of port(s) %s to NFQUEUE %s "
                    "(without --queue-bypass): unless rules of yours outside iptables do, "
                    "the target's replies reach the clients", ",".join(map(str, bare)),
                    queues)
    if not ipv6 or cfg.ipv6_rules_elsewhere:
        return ipv6
    bare6 = missing(True)
    if bare6:
        log.warning("IPv6 sessions refused: no ip6tables OUTPUT rule queues the replies of "
                    "port(s) %s to NFQUEUE %s (without --queue-bypass); add them, or set "
                    "ipv6_rules_elsewhere if rules outside ip6tables do",
                    ",".join(map(str, bare6)), queues)
        return False
    return True


def forwards() -> bool:
    """Whether this host forwards IPv4 or IPv6 (an assistant must not: the replies end
    here)."""
    for path in ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"):
        try:
            with open(path) as f:
                if f.read().strip() != "0":
                    return True
        except OSError:
            pass
    return False


def serve(cfg: Settings, sources: list, release: Callable[[], object]) -> int:
    """Listen for tcpcopyd, install the rules, and run the workers, one per reply source
    (an NFQUEUE binding or a capture socket); ``release()`` frees the sources at the end."""
    wakeups = [os.eventfd(0, os.EFD_NONBLOCK) for _ in sources]
    v6_listen = ":" in cfg.listen
    listener = socket.socket(socket.AF_INET6 if v6_listen else socket.AF_INET,
                             socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        if v6_listen:      # "::" takes IPv4 peers too (as ::ffff:a.b.c.d)
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind((cfg.listen, cfg.port))
        listener.listen(128)
    except OSError as e:
        listener.close()
        release()
        return fail(f"cannot listen on {show_host(cfg.listen, cfg.port)}: {e.strerror}")
    tag = f"interceptd:{cfg.instance}"
    installed: list[list[str]] = []
    installed6: list[list[str]] = []
    ipv6 = rules.has_ipv6()
    if not cfg.no_iptables:
        try:
            installed = rules.install(cfg.service_port, cfg.queue_num, cfg.queues, tag,
                                      cfg.instance)
        except rules.RuleError as e:
            listener.close()
            release()
            return fail(str(e))
        if ipv6 and not cfg.interface:
            try:
                installed6 = rules.install(cfg.service_port, cfg.queue_num, cfg.queues, tag,
                                           cfg.instance, v6=True)
            except rules.RuleError as e:
                ipv6 = False
                log.warning("IPv6 replies are not intercepted (%s): tcpcopyd copies only "
                            "IPv4 sessions here", e)
    elif not cfg.interface:
        ipv6 = operator_rules(cfg, ipv6)

    def unrule() -> None:
        rules.remove(installed)
        rules.remove(installed6, v6=True)
    try:
        seg = shmseg.create(cfg.instance, C.KIND, cfg.queues, 0, 64,
                            label=",".join(map(str, cfg.service_port)),
                            extra_size=shared.extra_size(cfg.queues, cfg.max_routes))
    except (shmseg.SegmentError, OSError) as e:
        unrule()
        listener.close()
        release()
        return fail(f"shared memory: {e}")
    if cfg.interface:
        source = f"capture on {cfg.interface} (assistant mode)"
    else:
        source = f"NFQUEUE {cfg.queue_num}..{cfg.queue_num + cfg.queues - 1}" + (
            f", guarded ({rules.guard_tag(cfg.instance)})" if installed
            else " (rules managed by the operator)")

    def factory(index: int, cpu: int) -> QueueWorker:
        return QueueWorker(cfg, index, cpu, seg, listener, sources[index], wakeups, ipv6)

    try:
        try:
            pages = metrics.page_server(cfg, seg)
        except ConfigError as e:
            return fail(str(e), e.code)
        try:
            write_pidfile(cfg.pidfile)
        except OSError as e:
            bad = cfg.invalid("pidfile", f"cannot write it: {e.strerror}"
                              + (" (a symbolic link is never followed)"
                                 if e.errno == errno.ELOOP else ""))
            return fail(str(bad), bad.code)
        reload = Reloader(PROG, DESCRIPTION, REGISTRY, LAYOUT, cfg, seg)
        reload.publish()
        log.info("interceptd %s: service ports %s, %s, %s, control %s", version(),
                 ",".join(map(str, cfg.service_port)), source,
                 "IPv4 and IPv6" if ipv6 else "IPv4", show_host(cfg.listen, cfg.port))
        status = StatusLine(seg, C.NAMES, ("queued", "routed"),
                            ("routes", "peers", "queue_drops"))
        # pinned from the last CPU down (tcpcopyd from the first up): on a host that runs
        # both daemons (a test box, the lab) their first workers do not share a core
        return Arbiter(PROG, ",".join(map(str, cfg.service_port)), cfg.queues, seg, factory,
                       allowed_cpus()[::-1], status=status, reload=reload,
                       pages=pages).run()
    finally:
        unrule()
        release()
        listener.close()
        seg.close()
        seg.unlink()
        remove_pidfile(cfg.pidfile)


if __name__ == "__main__":
    sys.exit(main())
