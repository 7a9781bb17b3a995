"""interceptd's settings."""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from tcpcopyd.net import wire
from tcpcopyd.service.addresses import (
    ip_address,
    metrics_listen_setting,
    networks,
    show_networks,
)
from tcpcopyd.service.settings import (
    Config,
    Layout,
    Registry,
    boolean,
    instance_name,
    int_range,
    log_level_setting,
    log_setting,
    pidfile_setting,
    port,
    port_list,
    secret_file_setting,
    setting,
    text,
)

# an allow network wider than this (fewer prefix bits) needs the shared secret
WIDEST_ALLOW_WITHOUT_SECRET = 8
# most workers (each pair of workers has a hand-off ring in shared memory)
MAX_QUEUES = 64


@dataclass
class Settings(Config):
    """interceptd's settings, in the order the docs list them."""

    service_port: list[int] = setting(
        ("--service-port",), None, port_list,
        "ports of the server under test whose replies are intercepted, e.g. 80,11211",
        metavar="PORTS", required=True, example=[80, 11211])
    port: int = setting(
        ("-p", "--port"), wire.DEFAULT_PORT, port,
        "control port tcpcopyd connects to", metavar="PORT", example=wire.DEFAULT_PORT)
    listen: str = setting(
        ("-b", "--listen"), "0.0.0.0", ip_address,
        "address the control port listens on (0.0.0.0: every IPv4 address; :: every "
        "address of both families; which peers may connect is `allow`)", metavar="ADDR",
        example="0.0.0.0")
    allow: tuple[IPv4Network | IPv6Network, ...] = setting(
        ("--allow",), (IPv4Network("127.0.0.0/8"),), networks,
        "networks (IPv4 or IPv6) whose hosts may connect to the control port, e.g. the "
        "online hosts' addresses; anyone else is refused (logged once a minute per "
        "address, counted)",
        metavar="CIDR[,CIDR...]", example=["198.18.2.0/24"], show=show_networks,
        default_text="127.0.0.0/8 (loopback only)")
    secret_file: str | None = secret_file_setting()
    max_connections: int = setting(
        ("--max-connections",), 256, int_range(1, 65536),
        "control connections each worker holds at most (more are closed at once, counted)",
        metavar="N", example=256)
    max_connections_per_address: int = setting(
        ("--max-connections-per-address",), 64, int_range(1, 65536),
        "control connections from one address each worker holds at most", metavar="N",
        example=64)
    max_routes: int = setting(
        ("--max-routes",), 131072, int_range(16, 1 << 22),
        "sessions each worker routes at most, over all its connections (more "
        "registrations are refused, counted)", metavar="N", example=131072)
    max_routes_per_address: int = setting(
        ("--max-routes-per-address",), 65536, int_range(16, 1 << 22),
        "sessions the connections from one address may hold in each worker (beyond: "
        "that address's oldest is dropped, counted)", metavar="N", example=65536)
    interface: str | None = setting(
        ("-i", "--interface"), None, text,
        "assistant mode: take the target's replies from this interface (AF_PACKET, one "
        "fanout socket per worker) instead of NFQUEUE; the target routes the client "
        "addresses to this host, which drops them by routing (no forwarding)",
        metavar="IFACE", example="eth1", default_text="NFQUEUE")
    assistant_forwarding_ok: bool = setting(
        ("--assistant-forwarding-ok",), False, boolean,
        "assistant mode starts even though this host forwards IPv4 (the operator drops "
        "the target's replies some other way: without that, forwarding would carry them to "
        "the real clients)", is_flag=True, example=False)
    no_iptables: bool = setting(
        ("--no-iptables",), False, boolean,
        "do not install/remove NFQUEUE rules (the operator manages them)", is_flag=True,
        example=False)
    ipv6_rules_elsewhere: bool = setting(
        ("--ipv6-rules-elsewhere",), False, boolean,
        "with --no-iptables: the operator's rules outside ip6tables (native nftables) "
        "queue the target's IPv6 replies; without it IPv6 sessions are taken only when "
        "ip6tables queues every service port", is_flag=True, example=False)
    queue_num: int = setting(
        ("--queue-num",), 0, int_range(0, 65535),
        "first NFQUEUE number", metavar="N", example=0)
    queues: int = setting(
        ("--queues",), 1, int_range(1, MAX_QUEUES),
        "workers, each pinned to its CPU, each reading one NFQUEUE number (or, in "
        "assistant mode, one capture socket); one is the cheapest way to take a load it "
        "keeps up with (more share a heavier load: the workers say when the queue "
        "overflows)", metavar="N", example=1)
    log: str | None = log_setting("/var/log/interceptd/interceptd.log")
    log_level: str = log_level_setting()
    metrics_listen: tuple[str, int] | None = metrics_listen_setting()
    pidfile: str | None = pidfile_setting("/run/tcpcopyd/interceptd.pid")
    instance: str = setting(
        ("--instance",), "interceptd", instance_name,
        "name of this instance: its lock and shm segment in /run/tcpcopyd, the tag of its "
        "iptables rules (one daemon per name)", metavar="NAME",
        example="interceptd")


    def finish(self) -> None:
        wide = [str(n) for n in self.allow if n.prefixlen < WIDEST_ALLOW_WITHOUT_SECRET]
        if wide and self.secret_file is None:
            raise self.invalid("allow", f"{', '.join(wide)} lets any host on it register "
                               "sessions and read the target's replies: name the online "
                               "hosts (e.g. 198.51.100.7/32), or set secret_file")
        if self.ipv6_rules_elsewhere and not self.no_iptables:
            raise self.invalid("ipv6_rules_elsewhere", "only with no_iptables (interceptd "
                               "installs its own ip6tables rules otherwise)")
        if self.queue_num + self.queues > 65536:
            raise self.invalid("queue_num", f"with {self.queues} queues the last would be "
                               f"{self.queue_num + self.queues - 1}, above 65535")


REGISTRY = Registry(Settings)
LAYOUT = Layout(lambda _cli, _parsed: ["interceptd"], lambda name: name == "interceptd",
                "table [interceptd]")
