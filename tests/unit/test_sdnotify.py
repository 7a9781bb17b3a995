"""systemd's notify protocol, against a real datagram socket standing in for systemd."""
from __future__ import annotations

import os
import socket

from tcpcopyd.service.sdnotify import Notifier


def test_ready_status_and_watchdog_reach_the_notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    sd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sd.bind(path)
    sd.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier()
    assert n.watchdog_every == 1.0          # twice per watchdog period
    n.send("READY=1", "STATUS=2/2 workers")
    assert sd.recv(4096) == b"READY=1\nSTATUS=2/2 workers"
    n.feed_watchdog()
    n.feed_watchdog()                       # too soon: not sent again
    assert sd.recv(4096) == b"WATCHDOG=1"
    sd.setblocking(False)
    try:
        sd.recv(4096)
        raise AssertionError("a second WATCHDOG=1 within the period")
    except BlockingIOError:
        pass
    n.close()
    sd.close()


def test_without_systemd_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    n = Notifier()
    n.send("READY=1")
    n.feed_watchdog()
    assert n.sock is None and n.watchdog_every is None


def test_the_watchdog_of_another_process_is_not_ours(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert Notifier().watchdog_every is None
