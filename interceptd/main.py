"""`interceptd`: the target-host daemon (entry point)."""
from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Sequence

from interceptd import rules, shared
from shm import segment as shmseg
from tcpcopyd import capabilities, logs, wire
from tcpcopyd.arbiter import (
    WORKER_BOOT_ERROR,
    Arbiter,
    allowed_cpus,
    catch_early_signals,
    remove_pidfile,
    write_pidfile,
)
from tcpcopyd.daemon import Reloader, StatusLine, version
from tcpcopyd.daemon import fail as _fail
from tcpcopyd.settings import (
    COMMON,
    EX_CONFIG,
    Config,
    Layout,
    Setting,
    boolean,
    int_range,
    ipv4,
    parse_args,
    port,
    port_list,
    text,
)

PROG = "interceptd"
# shm segment kind
KIND = 2

log = logging.getLogger(PROG)

# packets the kernel may hold for a queue before dropping them (fail-closed)
QUEUE_MAXLEN = 16384
# bytes of each queued packet copied to us: IPv4 header + the largest TCP header
COPY_RANGE = 60 + 60
# NFQUEUE copy mode "packet"
NFQNL_COPY_PACKET = 2

REGISTRY = (
    Setting("service_port", ("--service-port",), None, port_list,
            "ports of the server under test whose replies are intercepted, e.g. 80,11211",
            metavar="PORTS", required=True, example=[80, 11211]),
    Setting("port", ("-p", "--port"), wire.DEFAULT_PORT, port,
            "control port tcpcopyd connects to", metavar="PORT", example=wire.DEFAULT_PORT),
    Setting("bind", ("-b", "--bind"), "0.0.0.0", ipv4, "address of the control port",
            metavar="ADDR", example="0.0.0.0"),
    Setting("interface", ("-i", "--interface"), None, text,
            "assistant mode: take the target's replies from this interface (AF_PACKET, one "
            "fanout socket per worker) instead of NFQUEUE; the target routes the client "
            "addresses to this host, which drops them by routing (no forwarding)",
            metavar="IFACE", example="eth1", default_text="NFQUEUE"),
    Setting("no_iptables", ("--no-iptables",), False, boolean,
            "do not install/remove NFQUEUE rules (the operator manages them)", is_flag=True,
            example=False),
    Setting("queue_num", ("--queue-num",), 0, int_range(0, 65535),
            "first NFQUEUE number", metavar="N", example=0),
    Setting("queues", ("--queues",), None, int_range(1, 1024),
            "workers, each pinned to its CPU, each reading one NFQUEUE number (or, in "
            "assistant mode, one capture socket)", metavar="N", example=2,
            default_text="one per usable CPU"),
    *COMMON,
    Setting("instance", ("--instance",), "interceptd", text,
            "name of the shm segment and tag of the iptables rules", metavar="NAME",
            example="interceptd"),
)
LAYOUT = Layout(lambda _cli, _parsed: ["interceptd"], lambda name: name == "interceptd",
                "table [interceptd]")


DESCRIPTION = "Intercept the target's replies for tcpcopyd (target-host side)."


def fail(message: str, code: int = 1) -> int:
    return _fail(PROG, message, code)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(PROG, DESCRIPTION, REGISTRY, argv, LAYOUT)
    catch_early_signals()
    missing = capabilities.missing(("CAP_NET_ADMIN", "CAP_NET_RAW"))
    if missing:
        return fail(f"needs {', '.join(missing)} (NFQUEUE and iptables): run it as root, "
                    "with sudo or as the systemd unit")
    try:
        logs.setup(PROG, cfg.log, cfg.log_level)
    except OSError as e:
        return fail(f"cannot open log file {cfg.log}: {e.strerror}", EX_CONFIG)
    if cfg.queues is None:
        cfg.values["queues"] = len(allowed_cpus())
    if cfg.queue_num + cfg.queues > 65536:
        return fail("--queue-num + --queues exceeds 65535")
    if cfg.interface:
        return assistant(cfg)
    try:
        from netfilterqueue import NetfilterQueue
    except ImportError as e:
        return fail(f"NetfilterQueue is not installed ({e}): apt install "
                    "python3-netfilterqueue (built by tools/build-debs) or pip install "
                    "NetfilterQueue")
    from interceptd.worker import dispatch
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


def assistant(cfg: Config) -> int:
    """Assistant mode: the replies come from capture sockets on ``cfg.interface``."""
    from tcpcopyd import capture
    from tcpcopyd.options import check_interface
    err = check_interface(cfg.interface)
    if err:
        return fail(err, EX_CONFIG)
    sockets = []
    try:
        for _ in range(cfg.queues):
            sockets.append(capture.open_capture(cfg.interface, cfg.service_port,
                                                os.getpid() & 0xFFFF, source=True))
    except capture.CaptureError as e:
        for sock in sockets:
            sock.close()
        return fail(str(e))
    cfg.values["no_iptables"] = True
    return serve(cfg, sockets, lambda: [sock.close() for sock in sockets])


def serve(cfg: Config, sources: list, release) -> int:
    """Listen for tcpcopyd, install the rules, and run the workers, one per reply source
    (an NFQUEUE binding or a capture socket); ``release()`` frees the sources at the end."""
    wakeups = [os.eventfd(0, os.EFD_NONBLOCK) for _ in sources]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((cfg.bind, cfg.port))
        listener.listen(128)
    except OSError as e:
        listener.close()
        release()
        return fail(f"cannot listen on {cfg.bind}:{cfg.port}: {e.strerror}")
    tag = f"interceptd:{cfg.instance}"
    installed: list[list[str]] = []
    if not cfg.no_iptables:
        try:
            installed = rules.install(cfg.service_port, cfg.queue_num, cfg.queues, tag)
        except rules.RuleError as e:
            listener.close()
            release()
            return fail(str(e))
    try:
        seg = shmseg.create(cfg.instance, KIND, cfg.queues, 0, 64,
                            label=",".join(map(str, cfg.service_port)),
                            extra_size=shared.extra_size(cfg.queues))
    except (shmseg.SegmentError, OSError) as e:
        rules.remove(installed)
        listener.close()
        release()
        return fail(f"shared memory: {e}")
    write_pidfile(cfg.pidfile)
    reload = Reloader(PROG, DESCRIPTION, REGISTRY, LAYOUT, cfg, seg)
    reload.publish()
    if cfg.interface:
        source = f"capture on {cfg.interface} (assistant mode)"
    else:
        source = f"NFQUEUE {cfg.queue_num}..{cfg.queue_num + cfg.queues - 1}" + (
            "" if installed else " (rules managed by the operator)")
    log.info("interceptd %s: service ports %s, %s, control %s:%d", version(),
             ",".join(map(str, cfg.service_port)), source, cfg.bind, cfg.port)

    def boot(index: int, cpu: int) -> None:
        from interceptd.worker import Worker
        try:
            w = Worker(cfg, index, cpu, seg, listener, sources[index], wakeups)
        except Exception as e:  # noqa: BLE001 - reported, then the master stops
            log.error("worker %d cannot start: %s", index + 1, e)
            sys.exit(WORKER_BOOT_ERROR)
        w.run()

    try:
        status = StatusLine(seg, ("queued", "routed"), ("routes", "peers", "queue_drops"))
        return Arbiter(PROG, ",".join(map(str, cfg.service_port)), cfg.queues, seg, boot,
                       allowed_cpus(), status=status, reload=reload).run()
    finally:
        rules.remove(installed)
        release()
        listener.close()
        seg.close()
        seg.unlink()
        remove_pidfile(cfg.pidfile)


if __name__ == "__main__":
    sys.exit(main())
