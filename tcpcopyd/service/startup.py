"""What a daemon's start-up shares: the one-line failure message, the pid
file, the CPUs to pin workers to, and stop signals that arrive before the arbiter runs."""
from __future__ import annotations

import os
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
