"""Where each captured session is copied to: the -x rules as one map, and the one lookup the
engine and the comparison test both use."""
from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Protocol

# local service port, or (online address, port) for a rule bound to one address
#   -> (target address, target port)
Targets = dict


class Rule(Protocol):
    """One -x rule (tcpcopyd.online.options.Transfer)."""

    port: int
    online_ip: str | None
    target_ip: str
    target_port: int


def targets_of(rules: Iterable[Rule]) -> Targets:
    return {t.port if t.online_ip is None else (socket.inet_aton(t.online_ip), t.port):
            (socket.inet_aton(t.target_ip), t.target_port) for t in rules}


def target_for(targets: Targets, address: bytes, port: int) -> tuple[bytes, int] | None:
    """The target of the service at ``address``:``port`` of the online host, if copied."""
    return targets.get(port) or targets.get((address, port))
