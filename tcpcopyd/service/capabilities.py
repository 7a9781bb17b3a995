"""Which Linux capabilities this process holds (root without them, as in a restricted
systemd unit or a container, cannot capture or install rules)."""
from __future__ import annotations

BITS = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_NICE": 23}


def effective(status_path: str = "/proc/self/status") -> int:
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def missing(names: tuple[str, ...]) -> list[str]:
    """The capabilities of ``names`` that the effective set lacks."""
    caps = effective()
    return [n for n in names if not caps >> BITS[n] & 1]
