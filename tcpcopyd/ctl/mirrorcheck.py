"""`tcpcopyctl doctor tcpcopyd --mirror ...`: the checks of a mirror host. Is mirrored
traffic arriving for each online address of -x (a few seconds of capture), does the host
forward (it must not: the mirrored packets end here), is the interface a VXLAN device
whose UDP port only the mirror sources may reach, or a SPAN port (promiscuous mode)."""
from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

from tcpcopyd.ctl.checks import Check, fail, ok, sysctl
from tcpcopyd.net import netlink
from tcpcopyd.service.settings import Config

# how long the doctor listens for mirrored traffic, seconds
LISTEN = 3.0
ETH_P_ALL = 0x0003
IFF_PROMISC = 0x100


def seen_for(iface: str, wanted: list[tuple[str | None, int]], seconds: float = LISTEN
             ) -> dict[tuple[str | None, int], int]:
    """Client packets captured on ``iface`` within ``seconds``, per (online address or
    None, port) of ``wanted``."""
    counts = dict.fromkeys(wanted, 0)
    names = set(netlink.matching(iface)) if netlink.is_interface_set(iface) else {iface}
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    try:
        if len(names) == 1:
            sock.bind((next(iter(names)), ETH_P_ALL))
        sock.settimeout(0.2)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data, where = sock.recvfrom(256)
            except TimeoutError:
                continue
            key = _destination(data) if where[0] in names else None
            if key is None:
                continue
            for want in ((key[0], key[1]), (None, key[1])):
                if want in counts:
                    counts[want] += 1
    finally:
        sock.close()
    return counts


def _destination(data: bytes) -> tuple[str, int] | None:
    """The destination address and port of a TCP packet (IPv4, or IPv6 without extension
    headers)."""
    if len(data) >= 24 and data[0] >> 4 == 4 and data[9] == 6:
        at = (data[0] & 0xF) << 2
        if len(data) >= at + 4:
            return socket.inet_ntoa(data[16:20]), struct.unpack_from("!H", data, at + 2)[0]
    if len(data) >= 44 and data[0] >> 4 == 6 and data[6] == 6:
        return socket.inet_ntop(socket.AF_INET6, data[24:40]), \
            struct.unpack_from("!H", data, 42)[0]
    return None


def vxlan_port(iface: str) -> int | None:
    """The UDP port of a VXLAN device (None: not one)."""
    try:
        out = subprocess.run(["ip", "-j", "-d", "link", "show", "dev", iface],
                             capture_output=True, text=True, timeout=10)
        info = json.loads(out.stdout)[0].get("linkinfo", {})
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None
    if info.get("info_kind") != "vxlan":
        return None
    return int(info.get("info_data", {}).get("port", 4789))


def udp_port_guarded(port: int) -> bool:
    """Whether an iptables INPUT rule (or ip6tables one) of the filter or raw table
    restricts the senders of UDP ``port``: one matching the port with a source or a
    DROP/REJECT."""
    for tables in ("iptables", "ip6tables"):
        for table in ("raw", "filter"):
            try:
                out = subprocess.run([tables, "-w", "5", "-t", table, "-S"],
                                     capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            for line in out.splitlines():
                args = line.split()
                if args[:1] != ["-A"] or "udp" not in args or str(port) not in args:
                    continue
                if "-s" in args or "DROP" in args or "REJECT" in args:
                    return True
    return False


def promiscuous(iface: str) -> bool:
    try:
        with open(f"/sys/class/net/{iface}/flags") as f:
            return bool(int(f.read(), 16) & IFF_PROMISC)
    except (OSError, ValueError):
        return False


def mirror_checks(cfg: Config) -> Iterator[Check]:
    iface = cfg.interface
    wanted = [(t.online_ip, t.port) for t in cfg.transfer]
    if any(address is None for address, _ in wanted):
        yield fail("online addresses", "a rule of -x names no online address: on a mirror "
                   "host that copies every online host's traffic to that port",
                   "name the online servers: -x ONLINE_IP:PORT-TARGET_IP:PORT")
    try:
        counts = seen_for(iface, wanted)
    except OSError as e:
        yield fail("mirrored traffic", f"cannot capture on {iface}: {e.strerror or e}",
                   "run as root (CAP_NET_RAW)")
    else:
        for (address, port), n in counts.items():
            where = f"{address}:{port}" if address else f"port {port}"
            if n:
                yield ok("mirrored traffic", f"{n} client packets to {where} on {iface} in "
                         f"{LISTEN:.0f} s")
            else:
                yield fail("mirrored traffic", f"no client packet to {where} on {iface} in "
                           f"{LISTEN:.0f} s", "check the mirror session (its filter, its "
                           "target: this host's address), that the UDP port of VXLAN is open "
                           "to it here, and that the online server has traffic now")
    forwarding = [k for k in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding")
                  if sysctl(k) == "1"]
    if forwarding:
        yield fail("no forwarding", f"{', '.join(forwarding)} = 1: a mirror host forwards "
                   "nothing (the mirrored packets end here)",
                   "sysctl -w net.ipv4.ip_forward=0 net.ipv6.conf.all.forwarding=0")
    else:
        yield ok("no forwarding", "the mirrored packets end here")
    port = vxlan_port(iface)
    if port is None:
        yield ok("promiscuous", f"{iface} is not a VXLAN device (a SPAN port?): tcpcopyd "
                 f"--mirror puts it in promiscuous mode while it runs"
                 + (" (it is now)" if promiscuous(iface) else ""))
    elif udp_port_guarded(port):
        yield ok("vxlan senders", f"an iptables rule restricts who may send to UDP {port}")
    else:
        yield fail("vxlan senders", f"UDP {port} ({iface}'s VXLAN port) is open to any host "
                   "of the network: anyone could feed this copy traffic",
                   f"iptables -I INPUT -p udp --dport {port} ! -s MIRROR_SOURCES -j DROP "
                   "(the online hosts, or the cloud's mirror source addresses)")
