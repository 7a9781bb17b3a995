"""The host's network facts through netlink (pyroute2), never by running `ip` or
`ethtool`: routes, links (up, MTU, GRO), which interface holds an address, a watch on
one interface's state (``LinkWatch``: tcpcopyd notices its capture interface going down
and coming back), and the interfaces a set matches as they come and go
(``InterfaceFollower``: ``-i 'veth*'``)."""
from __future__ import annotations

import fnmatch
import logging
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("tcpcopyd.netlink")

IFF_UP = 0x1
IFF_RUNNING = 0x40
RTN_UNICAST = 1
RTMGRP_LINK = 0x1


@dataclass(frozen=True)
class Route:
    """The route the kernel would take to one address."""
    dev: str
    gateway: str | None
    unicast: bool


@dataclass(frozen=True)
class Link:
    """One network interface and its state."""
    name: str
    index: int
    up: bool           # administratively up and carrier on (IFF_UP and IFF_RUNNING)
    admin_up: bool     # IFF_UP
    mtu: int


def _link(msg) -> Link:
    flags = msg["flags"]
    return Link(msg.get_attr("IFLA_IFNAME"), msg["index"],
                bool(flags & IFF_UP and flags & IFF_RUNNING), bool(flags & IFF_UP),
                msg.get_attr("IFLA_MTU") or 0)


def route_get(dst: str) -> Route | None:
    """The kernel's route for ``dst`` (as `ip route get`), None if it has none."""
    with IPRoute() as ipr:
        try:
            msg = ipr.route("get", dst=dst)[0]
        except (NetlinkError, IndexError):
            return None
        oif = msg.get_attr("RTA_OIF")
        links = ipr.get_links(oif) if oif else []
        dev = links[0].get_attr("IFLA_IFNAME") if links else "?"
        return Route(dev, msg.get_attr("RTA_GATEWAY"), msg["type"] == RTN_UNICAST)


def default_gateway() -> str | None:
    with IPRoute() as ipr:
        for msg in ipr.get_default_routes(family=socket.AF_INET):
            gw = msg.get_attr("RTA_GATEWAY")
            if gw:
                return gw
    return None


def links() -> list[Link]:
    with IPRoute() as ipr:
        return [_link(msg) for msg in ipr.get_links()]


def link(name: str) -> Link | None:
    return next((lk for lk in links() if lk.name == name), None)


def interface_of(address: str) -> str | None:
    """The interface of this host that holds ``address``, if one does."""
    with IPRoute() as ipr:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        for msg in ipr.get_addr(family=family, address=address):
            found = ipr.get_links(msg["index"])
            if found:
                return found[0].get_attr("IFLA_IFNAME")
    return None


def gro(name: str) -> bool | None:
    """Whether generic receive offload is on (None: unknown)."""
    try:
        from pyroute2.ethtool import Ethtool
        ethtool = Ethtool()
    except Exception:   # noqa: BLE001 - an old pyroute2, or no ethtool netlink family
        return None
    try:
        feature = ethtool.get_features(name).features.get("rx-gro")
        return None if feature is None else bool(feature.enable)
    except Exception:   # noqa: BLE001 - unknown is an answer here
        return None
    finally:
        ethtool.close()


def _drain(sock: socket.socket) -> None:
    """Read the link events waiting on ``sock``: what they say is read from the links
    themselves (ENOBUFS, events lost, changes nothing)."""
    while True:
        try:
            sock.recv(65536)
        except OSError:     # BlockingIOError: all read; ENOBUFS: some lost
            return


class LinkWatch:
    """One interface's state, followed from the caller's poll loop: a netlink socket of the
    link group wakes it up (``fileno``), ``changes()`` then reads the state again and says
    whether the interface went down or came back up (or None: no change)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                  | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.bind((0, RTMGRP_LINK))
        current = link(name)
        self.index = current.index if current else 0
        self.up = bool(current and current.up)
        self.removed = current is None

    def fileno(self) -> int:
        return self.sock.fileno()

    def changes(self) -> bool | None:
        """Drain the events, look at the interface; its new state if it changed (True:
        up). One removed (or replaced by another of the same name) stays down."""
        _drain(self.sock)
        before = self.up
        current = None if self.removed else link(self.name)
        if current is None or current.index != self.index:
            self.up, self.removed = False, True
        else:
            self.up = current.up
        return self.up if self.up != before else None

    def close(self) -> None:
        self.sock.close()


# what makes -i a set of interfaces rather than one: a list, or a shell pattern
SET_MARKS = ",*?["


def is_interface_set(spec: str) -> bool:
    """Whether -i names a set of interfaces (``eth0,eth1``, ``veth*``), not one."""
    return any(c in spec for c in SET_MARKS)


def matching(spec: str) -> dict[str, int]:
    """The interfaces of this host that a set matches now: name -> index."""
    patterns = [p.strip() for p in spec.split(",") if p.strip()]
    return {lk.name: lk.index for lk in links()
            if any(fnmatch.fnmatchcase(lk.name, p) for p in patterns)}


class InterfaceFollower:
    """The interfaces a set matches, followed as they come and go (pods' veths): a netlink
    socket of the link group wakes the caller's poll loop (``fileno``); ``changes()`` then
    says which appeared and which went away (None: no change)."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                  | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.bind((0, RTMGRP_LINK))
        self.current = matching(spec)

    def fileno(self) -> int:
        return self.sock.fileno()

    def changes(self) -> tuple[list[str], list[str]] | None:
        _drain(self.sock)
        now = matching(self.spec)
        if now == self.current:
            return None
        added = sorted(n for n, i in now.items() if self.current.get(n) != i)
        gone = sorted(n for n, i in self.current.items() if now.get(n) != i)
        self.current = now
        return added, gone

    def close(self) -> None:
        self.sock.close()
