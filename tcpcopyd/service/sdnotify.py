"""systemd's notify protocol (sd_notify(3)): READY, RELOADING, STOPPING, STATUS and the
watchdog, sent by a master started by a ``Type=notify`` unit. Without $NOTIFY_SOCKET every
call does nothing."""
from __future__ import annotations

import os
import socket
import time


class Notifier:
    """systemd's notify socket, if the daemon runs under systemd (else every call does nothing)."""

    def __init__(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET", "")
        self.sock: socket.socket | None = None
        if addr:
            if addr[0] == "@":
                addr = "\0" + addr[1:]
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                self.sock.connect(addr)
            except OSError:
                self.sock.close()
                self.sock = None
        usec = os.environ.get("WATCHDOG_USEC", "")
        wd_pid = os.environ.get("WATCHDOG_PID", "")
        ours = not wd_pid or wd_pid == str(os.getpid())
        # feed the watchdog twice per period
        self.watchdog_every = int(usec) / 2e6 if usec.isdigit() and ours else None
        self._last_fed = 0.0

    def send(self, *fields: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.send("\n".join(fields).encode())
        except OSError:
            pass  # systemd gone or the socket full: nothing to do about it here

    def feed_watchdog(self) -> None:
        if self.watchdog_every is None:
            return
        now = time.monotonic()
        if now - self._last_fed >= self.watchdog_every:
            self._last_fed = now
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
