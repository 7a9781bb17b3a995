"""What a daemon's start-up shares: the one-line failure message, the pid
file, the CPUs to pin workers to, and stop signals that arrive before the arbiter runs."""
from __future__ import annotations

import os
import platform
import signal
import sys

# stop signals that arrived before the arbiter ran: the master had resources to release
EARLY_SIGNALS: list[int] = []


def catch_early_signals() -> None:
    """Called first thing by a daemon: SIGTERM/SIGINT/SIGQUIT during start-up are kept for
    the arbiter (which then stops at once, cleaning up) instead of killing the master with
    its iptables rules and shm segment left behind."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, lambda s, _f: EARLY_SIGNALS.append(s))


def fail(prog: str, message: str, code: int = 1) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return code


# processors whose store order the shared-memory code relies on (x86-64 keeps stores in
# order: shm/seqlock.py and shm/ring.py need no barrier there)
SUPPORTED_MACHINES = ("x86_64", "amd64")


def unsupported_machine() -> str | None:
    """Why the daemons must not run on this processor, or None."""
    machine = platform.machine()
    if machine.lower() in SUPPORTED_MACHINES:
        return None
    return (f"this processor ({machine or 'unknown'}) is not supported: the shared session "
            "table and rings rely on x86-64's store order, and would need memory barriers "
            "here (run tcpcopyd/interceptd on x86-64 hosts)")


def write_pidfile(path: str | None) -> None:
    """Write our pid to ``path``, never through a symbolic link (a link planted there would
    make root write where it points); raises OSError."""
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")


def remove_pidfile(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def allowed_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))
