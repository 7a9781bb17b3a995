"""Where each captured session is copied to: the -x rules as one map, and the one lookup the
engine and the comparison test both use."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from tcpcopyd.net.packet import packed

# the key of a rule: its local service port for an IPv4 rule, (ANY6, port) for an IPv6
# one, (online address, port) for a rule bound to one online address
#   -> (target address, target port); a captured packet goes to the rule of its family
Targets = dict
ANY6 = b""


class Rule(Protocol):
    """One -x rule (tcpcopyd.online.options.Transfer)."""

    port: int
    online_ip: str | None
    target_ip: str
    target_port: int


def targets_of(rules: Iterable[Rule]) -> Targets:
    out: Targets = {}
    for t in rules:
        target = packed(t.target_ip)
        if t.online_ip is not None:
            key: object = (packed(t.online_ip), t.port)
        else:
            key = t.port if len(target) == 4 else (ANY6, t.port)
        out[key] = (target, t.target_port)
    return out


def target_for(targets: Targets, address: bytes, port: int) -> tuple[bytes, int] | None:
    """The target of the service at ``address``:``port`` of the online host, if copied."""
    return (targets.get(port if len(address) == 4 else (ANY6, port))
            or targets.get((address, port)))
