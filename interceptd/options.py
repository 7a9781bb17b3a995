"""interceptd's settings."""
from __future__ import annotations

from dataclasses import dataclass

from tcpcopyd import wire
from tcpcopyd.service.settings import (
    Config,
    Layout,
    Registry,
    boolean,
    int_range,
    ipv4,
    log_level_setting,
    log_setting,
    pidfile_setting,
    port,
    port_list,
    setting,
    text,
)


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
    bind: str = setting(
        ("-b", "--bind"), "0.0.0.0", ipv4, "address of the control port",
        metavar="ADDR", example="0.0.0.0")
    interface: str | None = setting(
        ("-i", "--interface"), None, text,
        "assistant mode: take the target's replies from this interface (AF_PACKET, one "
        "fanout socket per worker) instead of NFQUEUE; the target routes the client "
        "addresses to this host, which drops them by routing (no forwarding)",
        metavar="IFACE", example="eth1", default_text="NFQUEUE")
    no_iptables: bool = setting(
        ("--no-iptables",), False, boolean,
        "do not install/remove NFQUEUE rules (the operator manages them)", is_flag=True,
        example=False)
    queue_num: int = setting(
        ("--queue-num",), 0, int_range(0, 65535),
        "first NFQUEUE number", metavar="N", example=0)
    queues: int = setting(
        ("--queues",), None, int_range(1, 1024),
        "workers, each pinned to its CPU, each reading one NFQUEUE number (or, in "
        "assistant mode, one capture socket)", metavar="N", example=2,
        default_text="one per usable CPU")
    log: str | None = log_setting()
    log_level: str = log_level_setting()
    pidfile: str | None = pidfile_setting()
    instance: str = setting(
        ("--instance",), "interceptd", text,
        "name of the shm segment and tag of the iptables rules", metavar="NAME",
        example="interceptd")


REGISTRY = Registry(Settings)
LAYOUT = Layout(lambda _cli, _parsed: ["interceptd"], lambda name: name == "interceptd",
                "table [interceptd]")
