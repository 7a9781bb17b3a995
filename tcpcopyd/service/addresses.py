"""Addresses in the settings of both daemons: IPv4 and IPv6 addresses, networks, an
address with its port, as parsed and as written back."""
from __future__ import annotations

from typing import Any

from tcpcopyd.service.settings import SettingError, list_items, port, setting


def networks(raw: Any) -> tuple:
    """'10.0.0.0/8,192.0.2.7,fd18::/16' or a TOML list: IPv4 and IPv6 networks (an address
    alone is a /32 or a /128)."""
    import ipaddress
    out = []
    for item in list_items(raw):
        try:
            out.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise SettingError(f"{item!r} is not an IPv4 or IPv6 network, e.g. "
                               "198.18.2.0/24 or fd18:2::/64") from None
    if not out:
        raise SettingError("expected at least one network")
    return tuple(out)


def show_networks(nets: tuple) -> list[str]:
    return [str(n) for n in nets]


def ipv4(raw: Any) -> str:
    """A dotted-quad IPv4 address, strictly: four decimal numbers 0-255 without leading
    zeros (inet_aton would read 192.168.001.010 as 192.168.1.8)."""
    import ipaddress
    try:
        return str(ipaddress.IPv4Address(str(raw)))
    except ValueError:
        raise SettingError(f"{raw!r} is not an IPv4 address (four numbers 0-255 without "
                           "leading zeros, e.g. 198.18.2.2)") from None


def ip_address(raw: Any) -> str:
    """An IPv4 address (strictly, as ``ipv4``) or an IPv6 one (brackets allowed), as
    written canonically (fd18:2::2)."""
    import ipaddress
    text_ = str(raw).strip()
    if ":" not in text_:
        return ipv4(text_)
    if text_.startswith("[") and text_.endswith("]"):
        text_ = text_[1:-1]
    try:
        return str(ipaddress.IPv6Address(text_))
    except ValueError:
        raise SettingError(f"{raw!r} is not an IPv6 address (e.g. fd18:2::2)") from None


def host_port(raw: Any) -> tuple[str, str]:
    """``IP:PORT``, ``[IPv6]:PORT``, ``IP`` or ``[IPv6]`` (or an IPv6 address alone) as
    (address, port text: '' when none is given); the address checked."""
    text_ = str(raw).strip()
    if text_.startswith("["):
        end = text_.find("]")
        if end < 0 or (end + 1 < len(text_) and text_[end + 1] != ":"):
            raise SettingError(f"{text_!r} is not [IPv6]:PORT, e.g. [fd18:2::2]:80")
        return ip_address(text_[1:end]), text_[end + 2:]
    if text_.count(":") > 1:
        return ip_address(text_), ""          # an IPv6 address without a port
    host, _, p = text_.partition(":")
    return ipv4(host), p


def show_host(address: str, p: int | None = None) -> str:
    """An address (and port) as written: 198.18.2.2:80, [fd18:2::2]:80."""
    host = f"[{address}]" if ":" in address else address
    return host if p is None else f"{host}:{p}"


def address_port(raw: Any) -> tuple[str, int]:
    """``IP:PORT`` (IPv4)"""
    text_ = str(raw).strip()
    host, sep, p = text_.rpartition(":")
    if not sep:
        raise SettingError(f"{text_!r} is not IP:PORT, e.g. 127.0.0.1:9821")
    return ipv4(host), port(p)


def metrics_listen_setting() -> Any:
    return setting(("--metrics-listen",), None, address_port,
                   "serve Prometheus metrics (GET /metrics) on this IP:PORT from the master; "
                   "off by default (tcpcopyctl metrics prints the same)", metavar="IP:PORT",
                   example="127.0.0.1:9821", default_text="off",
                   show=lambda a: f"{a[0]}:{a[1]}")
