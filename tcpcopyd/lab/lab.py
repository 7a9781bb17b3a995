"""The lab: namespaces, real servers and the two daemons, started and ended by pid."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import psutil

import interceptd.counters  # noqa: F401  (registers interceptd's segments for status)
import tcpcopyd.online.counters  # noqa: F401  (and tcpcopyd's)
from shm import rundir, seqlock
from shm import segment as shmseg
from tcpcopyd.lab import servers
from tcpcopyd.lab.net import (
    ASSISTANT_IP,
    MIRROR6_IP,
    MIRROR_DEVICE,
    MIRROR_IP,
    ONLINE2_TARGET_SIDE_IP,
    ONLINE6_IP,
    ONLINE6_TARGET_SIDE_IP,
    ONLINE_IP,
    ONLINE_TARGET_SIDE_IP,
    TARGET6_IP,
    TARGET_IP,
    Namespaces,
)

HTTP_PORT = 80
ONLINE6 = f"[{ONLINE6_IP}]"
MEMCACHED_PORT = 11211


class LabError(RuntimeError):
    pass


def wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Wait until ``cond()`` holds, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    if cond():
        return
    raise LabError(f"timed out after {timeout:.0f}s waiting for {what}")


MODULES = {"tcpcopyd": "tcpcopyd.online.main", "interceptd": "interceptd.main",
           "tcpcopyctl": "tcpcopyd.ctl.cli"}


def bin_path(name: str) -> str:
    """A console script of this installation (next to the running interpreter)."""
    cand = os.path.join(os.path.dirname(sys.executable), name)
    return cand if os.path.exists(cand) else (shutil.which(name) or name)


def command(name: str) -> list[str]:
    """How to run one of our programs: its console script, or ``python -m`` where the
    package is on PYTHONPATH without being installed."""
    path = bin_path(name)
    return [path] if os.path.isabs(path) and os.path.isfile(path) \
        else [sys.executable, "-m", MODULES[name]]


# the capabilities each daemon's container gets from the image (deploy/kubernetes grants
# the same), and nothing else
IMAGE_CAPABILITIES = {"tcpcopyd": "CAP_NET_RAW,CAP_NET_ADMIN",
                      "interceptd": "CAP_NET_ADMIN,CAP_NET_RAW"}
# what systemd-nspawn grants a container by default (systemd 252), all dropped but those
NSPAWN_CAPABILITIES = (
    "CAP_AUDIT_CONTROL,CAP_AUDIT_WRITE,CAP_CHOWN,CAP_DAC_OVERRIDE,CAP_DAC_READ_SEARCH,"
    "CAP_FOWNER,CAP_FSETID,CAP_IPC_OWNER,CAP_KILL,CAP_LEASE,CAP_LINUX_IMMUTABLE,CAP_MKNOD,"
    "CAP_NET_BIND_SERVICE,CAP_NET_BROADCAST,CAP_NET_RAW,CAP_SETFCAP,CAP_SETGID,CAP_SETPCAP,"
    "CAP_SETUID,CAP_SYS_ADMIN,CAP_SYS_BOOT,CAP_SYS_CHROOT,CAP_SYS_NICE,CAP_SYS_PTRACE,"
    "CAP_SYS_RESOURCE,CAP_SYS_TTY_CONFIG").split(",")


def image_command(root: str, name: str, ns: str) -> list[str]:
    """How to run one of our programs from the image's root file system ``root`` (mounted
    read-only): systemd-nspawn in the lab host ``ns``'s network namespace, with the
    capabilities of its manifest only (none for tcpcopyctl), the host's runtime directory
    bound (tcpcopyctl and the lab read the daemons' shared memory there), and SIGTERM
    passed to the daemon as under systemd. (Not under ``ip netns exec``: it hides the
    cgroup file system nspawn needs.)"""
    keep = IMAGE_CAPABILITIES.get(name, "")
    drop = ",".join(c for c in NSPAWN_CAPABILITIES if c not in keep.split(","))
    runtime = rundir.ensure()
    return ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "--read-only",
            "-D", root, f"--network-namespace-path=/run/netns/{ns}",
            f"--drop-capability={drop}", *([f"--capability={keep}"] if keep else []),
            f"--bind={runtime}:/run/tcpcopyd", "--kill-signal=SIGTERM", "--", name]


class Lab:
    def __init__(self, prefix: str = "tcl", nginx_workers: int = 1,
                 cpus: dict[str, str] | None = None, second_online: bool = False,
                 assistant: bool = False, attacker: bool = False,
                 nginx_extra: dict[str, str] | None = None, route_back: bool = True,
                 mirror: bool = False) -> None:
        self.ns = Namespaces(prefix, second_online, assistant, attacker, route_back, mirror)
        self.nginx_workers = nginx_workers
        self.nginx_extra = nginx_extra or {}   # host -> more nginx directives
        self.cpus = cpus or {}   # daemon -> CPU list for taskset (its workers pin inside it)
        self.dir = tempfile.mkdtemp(prefix=f"{prefix}-lab-")
        self.procs: dict[str, subprocess.Popen] = {}
        # the daemons run from this image root file system (tools/build-image) if set
        self.image_root: str | None = None

    def command(self, name: str, ns: str) -> list[str]:
        """How the lab runs one of our programs on host ``ns``: from this tree, or from the
        image (then without ``ip netns exec``: see image_command)."""
        if self.image_root:
            return image_command(self.image_root, name, ns)
        return ["ip", "netns", "exec", ns, *command(name)]

    # ---------------------------------------------------------------- lifecycle
    def up(self, memcached: bool = True) -> Lab:
        self.ns.create()
        for host in ("online", "target", *(("online2",) if self.ns.second_online else ())):
            root = os.path.join(self.dir, host)
            os.makedirs(root, exist_ok=True)
            conf = os.path.join(root, "nginx.conf")
            with open(conf, "w") as f:
                f.write(servers.nginx_conf(root, HTTP_PORT, self.nginx_workers,
                                           self.nginx_extra.get(host, "")))
            self.start(f"nginx-{host}", getattr(self.ns, host),
                       ["nginx", "-c", conf, "-e", os.path.join(root, "error.log")])
            if memcached and host != "online2":
                self.start(f"memcached-{host}", getattr(self.ns, host),
                           servers.memcached_args(MEMCACHED_PORT))
        for host in ("online", "target", *(("online2",) if self.ns.second_online else ())):
            self.wait_listening(getattr(self.ns, host), HTTP_PORT)
            if memcached and host != "online2":
                self.wait_listening(getattr(self.ns, host), MEMCACHED_PORT)
        return self

    def down(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        self.ns.destroy()

    def cleanup_files(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()
        self.cleanup_files()

    # ---------------------------------------------------------------- processes
    def start(self, name: str, ns: str | None, args: list[str]) -> subprocess.Popen:
        """``args`` started in lab host ``ns`` (None: ``args`` places itself there)."""
        if ns is not None:
            args = ["ip", "netns", "exec", ns, *args]
        if name in self.cpus:
            args = ["taskset", "-c", self.cpus[name], *args]
        log = open(os.path.join(self.dir, f"{name}.log"), "ab")
        p = subprocess.Popen(args, stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.procs[name] = p
        return p

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        p = self.procs.pop(name, None)
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                for child in _children(p.pid):
                    child.kill()
                p.kill()
                p.wait()
        return p.returncode

    def log_path(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.log")

    def log_text(self, name: str) -> str:
        try:
            with open(self.log_path(name), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_log(self, name: str, text: str, count: int = 1, timeout: float = 20.0) -> None:
        def seen() -> bool:
            p = self.procs.get(name)
            if p is not None and p.poll() is not None:
                raise LabError(f"{name} exited with {p.returncode}:\n{self.log_text(name)}")
            return self.log_text(name).count(text) >= count
        wait_for(seen, timeout, f"{name} to log {text!r} x{count}")

    def wait_listening(self, ns: str, port: int, timeout: float = 20.0) -> None:
        def listening() -> bool:
            out = self.ns.run(ns, ["ss", "-Htln", f"sport = :{port}"], check=False).stdout
            return bool(out.strip())
        wait_for(listening, timeout, f"port {port} to listen in {ns}")

    # ---------------------------------------------------------------- the daemons
    def start_interceptd(self, ports: list[int] | None = None, extra: list[str] = ()
                         ) -> subprocess.Popen:
        ports = ports or [HTTP_PORT, MEMCACHED_PORT]
        seen = self.log_text("interceptd").count(", control port ")
        if self.ns.with_assistant:   # interceptd on the assistant host, capturing on eth0
            ns, extra = self.ns.assistant, ["-i", "eth0", *extra]
        else:
            ns = self.ns.target
        # the online hosts connect from their target-side addresses; loopback: the doctor
        allow = ",".join(("127.0.0.0/8", ONLINE_TARGET_SIDE_IP, ONLINE2_TARGET_SIDE_IP,
                          MIRROR_IP, "::1", ONLINE6_TARGET_SIDE_IP, MIRROR6_IP))
        p = self.start("interceptd", None,
                       [*self.command("interceptd", ns), "--service-port",
                        ",".join(map(str, ports)),
                        "--instance", f"{self.ns.prefix}-interceptd", "--allow", allow,
                        *extra])
        self.wait_log("interceptd", ", control port ", count=seen + 1)
        return p

    def start_tcpcopyd(self, ports: list[int] | None = None, extra: list[str] = (),
                       wait_connected: bool = True, ipv6: bool = False,
                       server: str | None = None) -> subprocess.Popen:
        """tcpcopyd on the online host; ``ipv6``: it copies the IPv6 clients as well (a
        rule of each family per port); ``server``: interceptd's address as -s takes it."""
        ports = ports or [HTTP_PORT, MEMCACHED_PORT]
        rules = ",".join(f"{p}-{TARGET_IP}:{p}" + (f",{p}-[{TARGET6_IP}]:{p}" if ipv6 else "")
                         for p in ports)
        seen = {text: self.log_text("tcpcopyd").count(text)
                for text in ("capturing on", "connected to interceptd")}
        server = server or (ASSISTANT_IP if self.ns.with_assistant else TARGET_IP)
        host, where = self.ns.online, ["-i", "eth0"]
        if self.ns.with_mirror:   # on the mirror host, from the online host's mirror
            host, where = self.ns.mirror, ["-i", MIRROR_DEVICE, "--mirror"]
            rules = ",".join(f"{ONLINE6 if '[' in r else ONLINE_IP}:{r}"
                             for r in rules.split(","))
        p = self.start("tcpcopyd", None,
                       [*self.command("tcpcopyd", host), "-x", rules, "-s", server, *where,
                        "--instance", f"{self.ns.prefix}-tcpcopyd", *extra])
        self.wait_log("tcpcopyd", "capturing on", count=seen["capturing on"] + 1)
        if wait_connected:
            self.wait_log("tcpcopyd", "connected to interceptd",
                          count=seen["connected to interceptd"] + 1)
            self.wait_workers_connected(f"{self.ns.prefix}-tcpcopyd")
        return p

    def wait_workers_connected(self, instance: str, timeout: float = 30.0) -> None:
        """Until every worker of a tcpcopyd has a control link up (its shm link records):
        the workers boot and connect each on its own (a pool's parked ones are not
        running)."""
        seg = shmseg.attach(instance, readonly=True)

        def connected() -> bool:
            try:
                return all(any(link.up for link in rec.links)
                           for rec in map(seg.read_worker, range(seg.n_workers))
                           if rec.pool != shmseg.POOL_PARKED)
            except seqlock.TornRead:
                return False
        try:
            wait_for(connected, timeout, f"every worker of {instance} to connect")
        finally:
            seg.close()

    def daemon_cpu_seconds(self, name: str) -> float:
        """utime+stime of a daemon's master and workers (alive ones)."""
        p = self.procs.get(name)
        if p is None or p.poll() is not None:
            return 0.0
        total = 0.0
        for proc in [psutil.Process(p.pid), *_children(p.pid)]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def nginx_log(self, host: str) -> list[list[str]]:
        path = os.path.join(self.dir, host, "access.log")
        try:
            with open(path) as f:
                return [line.split() for line in f if line.strip()]
        except FileNotFoundError:
            return []


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
