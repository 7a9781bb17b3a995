"""tcpcopyd's settings (tcpcopy's letters where it has them)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from tcpcopyd.net import netlink, wire
from tcpcopyd.online import answers
from tcpcopyd.service.addresses import (
    host_port,
    ip_address,
    ipv4,
    metrics_listen_setting,
    show_host,
)
from tcpcopyd.service.settings import (
    Config,
    Layout,
    Registry,
    SettingError,
    boolean,
    float_range,
    instance_name,
    int_range,
    list_items,
    log_level_setting,
    log_setting,
    pidfile_setting,
    port,
    secret_file_setting,
    setting,
    text,
)

# most -x rules (every one is a port of the capture filter and a line of the live settings)
MAX_TRANSFERS = 256
# session slots each worker needs at least
MIN_SLOTS_PER_WORKER = 16
# workers = auto: a pool that grows and shrinks with the load
AUTO_WORKERS = 0


def worker_count(raw: object) -> int:
    """``auto`` (AUTO_WORKERS) or a number of workers from 1 to 1024."""
    if isinstance(raw, str) and raw.strip().lower() == "auto":
        return AUTO_WORKERS
    try:
        return int_range(1, 1024)(raw)
    except SettingError:
        raise SettingError("expected an integer from 1 to 1024, or auto") from None


def show_workers(value: int) -> int | str:
    return "auto" if value == AUTO_WORKERS else value


@dataclass(frozen=True)
class Transfer:
    """One -x rule: captured traffic to local ``port`` is copied to ``target_ip:target_port``."""
    online_ip: str | None
    port: int
    target_ip: str
    target_port: int

    @property
    def ipv6(self) -> bool:
        return ":" in self.target_ip

    def __str__(self) -> str:
        local = str(self.port) if self.online_ip is None else show_host(self.online_ip,
                                                                        self.port)
        return f"{local}-{show_host(self.target_ip, self.target_port)}"


def transfers(raw: object) -> list[Transfer]:
    """``[ONLINE_IP:]PORT-TARGET_IP:TARGET_PORT[,...]``, at most MAX_TRANSFERS of them; an
    IPv6 address in brackets. A captured packet goes to the rule of its own family: one
    port may have a rule of each."""
    items = list_items(raw)
    if len(items) > MAX_TRANSFERS:
        raise SettingError(f"{len(items)} rules: at most {MAX_TRANSFERS}")
    out = []
    for item in items:
        item = str(item).strip()
        try:
            local, target = item.split("-")
            tip, tport = host_port(target)
            if ":" in local:
                oip, lport = host_port(local)
            else:
                oip, lport = None, local
            rule = Transfer(oip, port(lport), tip, port(tport))
        except (ValueError, SettingError):
            raise SettingError(f"{item!r} is not [ONLINE_IP:]PORT-TARGET_IP:TARGET_PORT, "
                               "e.g. 80-198.18.2.2:80 or 80-[fd18:2::2]:80") from None
        if oip is not None and (":" in oip) != rule.ipv6:
            raise SettingError(f"{item!r}: the online address and the target are of "
                               "different families (a packet is copied to a target of "
                               "its own family)")
        out.append(rule)
    if not out:
        raise SettingError("expected at least one PORT-TARGET_IP:TARGET_PORT")
    keys = [(t.ipv6, t.online_ip, t.port) for t in out]
    if len(set(keys)) != len(keys):
        raise SettingError("the same local address and port appear twice")
    any_address = {(t.ipv6, t.port) for t in out if t.online_ip is None}
    if any(t.online_ip is not None and (t.ipv6, t.port) in any_address for t in out):
        raise SettingError("a port is copied both for every address and for one address")
    return out


def servers(raw: object) -> list[tuple[str, int]]:
    """``IP[:PORT][,...]`` of interceptd control ports."""
    items = list_items(raw)
    out = []
    for item in items:
        item = str(item).strip()
        try:
            host, p = host_port(item)
            out.append((host, port(p) if p else wire.DEFAULT_PORT))
        except SettingError as e:
            raise SettingError(f"{item!r}: {e}; expected IP[:PORT], e.g. 198.18.2.2:36524 "
                               "or [fd18:2::2]:36524") from None
    if not out:
        raise SettingError("expected an interceptd address")
    return out


def show_transfers(rules: list[Transfer]) -> list[str]:
    return [str(t) for t in rules]


def show_servers(addresses: list[tuple[str, int]]) -> list[str]:
    return [show_host(host, p) for host, p in addresses]


# most addresses an IPv6 prefix of -c may hold (a /112)
POOL_PREFIX_MAX = 1 << 16


def client_pool(raw: object) -> list[str]:
    """IPv4 addresses, A.B.C.x (.1-.254), IPv6 addresses and IPv6 prefixes (fd18:9::/120,
    at most a /112); a copy takes an address of its client's family."""
    import ipaddress
    items = list_items(raw)
    out = []
    what = ("is not an IPv4 address, A.B.C.x, an IPv6 address or an IPv6 prefix "
            "(fd18:9::/120)")
    for item in items:
        item = str(item).strip()
        if "/" in item:
            try:
                net = ipaddress.IPv6Network(item, strict=True)
            except ValueError:
                raise SettingError(f"{item!r} {what}, its host bits zero") from None
            if net.num_addresses > POOL_PREFIX_MAX:
                raise SettingError(f"{item!r} holds {net.num_addresses} addresses: at most "
                                   "a /112")
            item = str(net)
        else:
            try:
                if item.endswith(".x"):
                    ipv4(item[:-1] + "1")
                else:
                    item = ip_address(item)
            except SettingError:
                raise SettingError(f"{item!r} {what}") from None
        out.append(item)
    if not out:
        raise SettingError("expected at least one address")
    return out


def always_on(raw: object) -> bool:
    if not boolean(raw):
        raise SettingError("tcpcopyd always keeps running without interceptd; the key "
                           "only accepts true")
    return True


def noise_rules(raw: object) -> tuple[str, ...]:
    """header names, or re:EXPRESSION"""
    out = []
    for item in list_items(raw):
        try:
            out.append(answers.check_rule(str(item)))
        except ValueError as e:
            raise SettingError(str(e)) from None
    return tuple(out)


def percent(raw: object) -> int:
    return int_range(1, 100)(raw)


@dataclass
class Settings(Config):
    """tcpcopyd's settings, in the order the docs list them."""

    transfer: list[Transfer] = setting(
        ("-x", "--transfer"), None, transfers,
        "what to copy: [ONLINE_IP:]PORT-TARGET_IP:TARGET_PORT[,...], IPv6 addresses in "
        "brackets (80-[fd18:2::2]:80; a packet goes to the rule of its family); a reload "
        "may change the targets and the online addresses of the same ports (new "
        "sessions follow)",
        metavar="RULES", required=True, example="80-198.18.2.2:80", live=True,
        show=show_transfers)
    server: list[tuple[str, int]] = setting(
        ("-s", "--server"), None, servers,
        "interceptd address(es): IP[:PORT][,...] ([IPv6]:PORT), default port 36524",
        metavar="ADDR",
        required=True, example="198.18.2.2:36524", show=show_servers)
    interface: str = setting(
        ("-i", "--interface"), None, text,
        "capture interface (client traffic arrives there; the systemd unit's instance "
        "name), a set of them — a list and shell patterns, e.g. eth0,veth* (followed as "
        "they come and go) — or a pcap/pcapng file to replay offline: a path with a /, "
        "e.g. ./day.pcap",
        metavar="IFACE|PATH",
        required=True, example="eth0")
    sample_rate: int = setting(
        ("-r", "--sample-rate"), 100, percent,
        "percentage of sessions copied: whole sessions, chosen by a hash of the client "
        "address and port", metavar="PERCENT", example=100, live=True)
    timeout: float = setting(
        ("-t", "--timeout"), 120.0, float_range(1, 86400),
        "idle timeout of a session, seconds", metavar="SECONDS", example=120, live=True)
    copies: int = setting(
        ("-n", "--copies"), 1, int_range(1, 64),
        "copies of every session sent to the target, each from its own port (see -f)",
        metavar="N", example=1)
    port_block: int | None = setting(
        ("-f", "--port-block"), None, int_range(0, 7),
        "block of source ports (0-7) this instance's copies use toward the target: give "
        "each tcpcopyd copying to the same target its own (with -n, -c or -H the copies "
        "use block 0 unless told)", metavar="K", example=0, default_text="client's ports")
    client_pool: list[str] | None = setting(
        ("-c", "--client-pool"), None, client_pool,
        "source addresses of the copies instead of the clients' (an x as last octet: "
        ".1-.254; the target must route them back to the interception point)",
        metavar="IP[,IP...]", example="198.18.6.x", default_text="client's address")
    localhost_as: str | None = setting(
        ("-H", "--localhost-as"), None, ip_address,
        "source address of copies of sessions from 127.0.0.1 (an IPv4 address), or from "
        "::1 (an IPv6 one)", metavar="IP",
        example="198.18.1.9", default_text="none")
    ramp: bool = setting(
        ("-g", "--ramp"), False, boolean,
        "at start, copy 1 %% of the sessions and 1 %% more every second up to -r",
        is_flag=True, example=False)
    keepalive_timeout: float | None = setting(
        ("-k", "--keepalive-timeout"), None, float_range(1, 86400),
        "idle timeout of a session with nothing outstanding (a keep-alive connection "
        "between requests), seconds", metavar="SECONDS", example=120, live=True,
        default_text="-t")
    mirror: bool = setting(
        ("--mirror",), False, boolean,
        "capture from a traffic mirror (a VXLAN device of AWS/GCP mirroring or of tc "
        "mirred, a switch's SPAN port), on a host of its own: the interface in promiscuous "
        "mode, the same packet delivered twice skipped (mirror_duplicates), cut packets "
        "counted (truncated), status per mirror source (online server address); -x names "
        "the online addresses. With a capture file: its duplicates skipped", is_flag=True,
        example=False)
    only_syn: bool = setting(
        ("-O", "--only-syn"), False, boolean,
        "copy only the sessions seen from their SYN (no fake SYN for sessions that were "
        "open before tcpcopyd started)", is_flag=True, example=False)
    no_wait: bool = setting(
        ("-W", "--no-wait"), False, boolean,
        "do not wait for the target's answer before sending the next request (same as "
        "--pace-timeout 0)", is_flag=True, example=False, live=True)
    rtt: float | None = setting(
        ("-R", "--rtt"), None, float_range(0.1, 60000),
        "RTT to the target assumed until measured, milliseconds (the first "
        "retransmission timeout is 3x it; default 1 s)", metavar="MS", example=10,
        default_text="measured")
    memory: int = setting(
        ("-m", "--memory"), 1024, int_range(1, 1 << 20),
        "MiB all workers may buffer, payload and per-segment overhead (each worker its "
        "share): above 7/8 of it new sessions are refused (sessions_refused), a session "
        "that would grow past it is reset (sessions_overflow); the whole tcpcopyd stays "
        "within it plus a constant (README)", metavar="MB", example=1024)
    connections: int = setting(
        ("-C", "--connections"), 1, int_range(1, 16),
        "control connections of each worker to each interceptd (a session uses one)",
        metavar="N", example=1)
    secret_file: str | None = secret_file_setting()
    lonely: bool = setting(
        ("-L", "--lonely"), True, always_on,
        "keep running when no interceptd is reachable, reconnecting with backoff; always "
        "on (tcpcopy's -L): a restarted interceptd must not end the copy, and sessions "
        "are buffered meanwhile", is_flag=True, example=True, default_text="on")
    accelerate: float = setting(
        ("-a", "--accelerate"), 1.0, float_range(0.001, 1000),
        "offline replay (-i ./FILE): this many times faster than captured", metavar="N",
        example=1)
    idle_cut: float | None = setting(
        ("-I", "--idle-cut"), None, float_range(0, 3600000),
        "offline replay: gaps between packets longer than this are cut to it, "
        "milliseconds", metavar="MS", example=1000, default_text="none")
    repeat: int = setting(
        ("-T", "--repeat"), 1, int_range(1, 1000000),
        "offline replay: play the file this many times", metavar="N", example=1)
    mtu: int = setting(
        ("-M", "--mtu"), 1500, int_range(576, 65535),
        "MTU of the path to the target; larger captured frames are cut", metavar="MTU",
        example=1500)
    mss: int = setting(
        ("-D", "--mss"), 1460, int_range(88, 65495),
        "MSS announced in a fake SYN", metavar="MSS", example=1460)
    log: str | None = log_setting("/var/log/tcpcopyd/eth0.log")
    log_level: str = log_level_setting()
    metrics_listen: tuple[str, int] | None = metrics_listen_setting()
    pidfile: str | None = pidfile_setting("/run/tcpcopyd/eth0.pid")
    workers: int = setting(
        ("--workers",), AUTO_WORKERS, worker_count,
        "worker processes, each pinned to a CPU and reading its own capture socket. auto: "
        "a pool that starts with one (the cheapest way to copy a load it keeps up with), "
        "adds one while the busiest is busy (grow_at) or lags, up to one per CPU, and gives "
        "one back once the load fits in one fewer (shrink_at, shrink_after); a session stays "
        "with the worker that opened it. A number: that many, always",
        metavar="N|auto", example="auto", show=show_workers, default_text="auto")
    grow_at: int = setting(
        ("--grow-at",), 70, int_range(1, 100),
        "workers = auto: a worker is added when the busiest one used more than this "
        "percentage of its CPU for 3 s running, or its capture lags as long (packets over "
        "20 ms old, or over a quarter of max_lag, or dropped)", metavar="PERCENT",
        example=70)
    shrink_at: int = setting(
        ("--shrink-at",), 30, int_range(1, 99),
        "workers = auto: a worker is given back when the pool's load, spread over one "
        "worker fewer, stays below this percentage of a CPU for shrink_after seconds",
        metavar="PERCENT", example=30)
    shrink_after: float = setting(
        ("--shrink-after",), 30.0, float_range(1, 3600),
        "workers = auto: how long the load must stay low before a worker is given back",
        metavar="SECONDS", example=30)
    instance: str | None = setting(
        ("--instance",), None, instance_name,
        "name of this instance: its lock and shm segment in /run/tcpcopyd (one daemon per "
        "name)", metavar="NAME",
        example="tcpcopyd.eth0", default_text="tcpcopyd.IFACE")
    session_slots: int = setting(
        ("--session-slots",), 65536, int_range(16, 1 << 22),
        "capacity of the shared session table (full: the oldest session is evicted, "
        "counted); with workers = auto, of each worker's part of it", metavar="N",
        example=65536)
    session_buffer: int = setting(
        ("--session-buffer",), 64 << 20, int_range(1 << 16, 1 << 34),
        "most bytes buffered for one session (payload and per-segment overhead) before "
        "it is reset (counted)",
        metavar="BYTES", example=64 << 20)
    total_buffer: int = setting(
        ("--total-buffer",), 512 << 20, int_range(1 << 20, 1 << 40),
        "most bytes one worker buffers over all its sessions (above: the session that "
        "grows is reset, counted)", metavar="BYTES", example=512 << 20)
    max_lag: float = setting(
        ("--max-lag",), 1.0, float_range(0.01, 3600),
        "captured packets older than this when their turn comes are dropped (counted "
        "lag_drops) until the worker is back within half of it: a copy that falls behind "
        "stays live; seconds", metavar="SECONDS", example=1, live=True)
    compare: bool = setting(
        ("--compare",), False, boolean,
        "comparison test: also capture the online server's answers, ask interceptd for the "
        "first bytes of the target's, and write every exchange (request, both answers' "
        "status, size and timing) to compare_log; tcpcopyctl report reads it",
        is_flag=True, example=False)
    compare_log: str | None = setting(
        ("--compare-log",), None, text,
        "the comparison test's exchanges, JSON lines (reopened on SIGUSR1)",
        metavar="FILE", example="/var/log/tcpcopyd/compare-eth0.jsonl",
        default_text="/var/log/tcpcopyd/compare-IFACE.jsonl")
    compare_ignore: tuple[str, ...] = setting(
        ("--compare-ignore",), ("Date",), noise_rules,
        "what differs between any two answers and is not compared: header names, or "
        "re:EXPRESSION (bytes matching it)", metavar="RULES", example=["Date", "Expires"],
        default_text="Date", show=list)
    pace_timeout: float = setting(
        ("--pace-timeout",), 2.0, float_range(0, 600),
        "longest wait for the target's answer before the next request goes anyway",
        metavar="SECONDS", example=2, live=True)


    def finish(self) -> None:
        if self.compare and self.interface and "/" in self.interface:
            raise self.invalid("compare", "the comparison test needs a live capture (the "
                               "online server's answers), not a capture file")
        if self.compare and self.compare_log is None:
            self.compare_log = f"/var/log/tcpcopyd/compare-{self.interface}.jsonl"
        if self.shrink_at >= self.grow_at:
            raise self.invalid("shrink_at", f"{self.shrink_at} must be below grow_at "
                               f"({self.grow_at}): a pool would add and give back workers "
                               "in turn")
        if self.session_slots < MIN_SLOTS_PER_WORKER * self.workers:
            raise self.invalid("session_slots", f"{self.workers} workers need at least "
                               f"{MIN_SLOTS_PER_WORKER * self.workers} "
                               f"({MIN_SLOTS_PER_WORKER} each): raise it, or lower workers")


REGISTRY = Registry(Settings)
# tables of interceptd in a shared file are not ours
OTHER_DAEMON_TABLES = ("interceptd",)


def _tables(cli: dict, parsed: dict[str, dict]) -> list[str]:
    iface = cli.get("interface") or parsed.get("default", {}).get("interface")
    return ["default"] + ([iface] if iface and iface != "default" else [])


SEED_FORM = "LOCAL_IP[:LOCAL_IP2...] LOCAL_PORT REMOTE_IP REMOTE_PORT"


def seed_form(words: list[str]) -> tuple[dict, dict]:
    """tcpcopy's first command form, ``LOCAL_IP[:LOCAL_IP2...] LOCAL_PORT REMOTE_IP
    REMOTE_PORT``: one -x rule per local address; interceptd at REMOTE_IP (its default
    port) and the interface that holds the first LOCAL_IP, unless -s/-i or the file say
    otherwise."""
    if len(words) != 4:
        raise SettingError(f"expected {SEED_FORM}, e.g. 10.0.0.13 12321 10.0.0.148 12321 "
                           "(tcpcopy's first form), or the flags -x, -s and -i")
    local_ips, local_port, remote_ip, remote_port = words
    # IPv6 addresses in brackets: [fd18:1::2]:[fd18:1::3]
    ips = re.findall(r"\[[^\]]*\]|[^:\[\]]+", local_ips) if "[" in local_ips \
        else local_ips.split(":")
    remote = show_host(ip_address(remote_ip))
    rules = transfers(",".join(f"{show_host(ip_address(ip))}:{local_port}-{remote}:"
                               f"{remote_port}" for ip in ips))
    fallback: dict = {"server": servers(remote)}
    iface = netlink.interface_of(rules[0].online_ip or "")
    if iface:
        fallback["interface"] = iface
    return {"transfer": rules}, fallback


LAYOUT = Layout(_tables, lambda name: name not in OTHER_DAEMON_TABLES,
                "table [default], then the table named after the interface, e.g. [eth0]",
                positional=SEED_FORM, from_words=seed_form)

