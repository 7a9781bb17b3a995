"""-r sampling copies whole sessions; a reload (SIGHUP) changes it live in every worker;
SIGUSR1 reopens the log file of the master and the workers."""
from __future__ import annotations

import collections
import os
import signal

import pytest

from shm import segment as shmseg
from tcpcopyd.health import status
from tcpcopyd.lab import load
from tcpcopyd.lab.lab import wait_for

pytestmark = pytest.mark.lab

NO_TCPCOPYD = {"tcpcopyd": False}


def totals(lab) -> dict[str, int]:
    seg = shmseg.attach(f"{lab.ns.prefix}-tcpcopyd")
    try:
        return status.totals(seg)
    finally:
        seg.close()


def sessions(log) -> collections.Counter:
    """client port -> requests logged"""
    return collections.Counter(f[1] for f in log)


def copied_share(lab, requests: int, per_connection: int) -> tuple[float, int]:
    """Run a load; wait for the target; return the share of online sessions the target
    saw, and how many of the copied sessions are incomplete."""
    online_before = len(lab.nginx_log("online"))
    target_before = len(lab.nginx_log("target"))
    r = load.h2load(lab, requests=requests, rate=2000, per_connection=per_connection)
    assert r.succeeded == requests, r.output
    online = sessions(lab.nginx_log("online")[online_before:])
    assert sum(online.values()) == requests
    # every session the target got is whole: wait until the copied sessions are over,
    # then compare per session
    wait_for(lambda: totals(lab)["sessions_active"] == 0, 60, "copied sessions to finish")
    target = sessions(lab.nginx_log("target")[target_before:])
    incomplete = sum(1 for port, n in target.items() if online.get(port) != n)
    return len(target) / len(online), incomplete


def write_config(path: str, rate: int, extra: str = "") -> None:
    with open(path, "w") as f:
        f.write(f"[default]\nsample_rate = {rate}\n{extra}")


@pytest.mark.parametrize("lab", [NO_TCPCOPYD], indirect=True)
def test_sample_rate_copies_a_share_of_whole_sessions(lab):
    lab.start_tcpcopyd(extra=["-r", "20"])
    share, incomplete = copied_share(lab, requests=10000, per_connection=2)
    assert 0.18 <= share <= 0.22, share
    assert incomplete == 0
    assert totals(lab)["not_sampled"] > 0


@pytest.mark.parametrize("lab", [NO_TCPCOPYD], indirect=True)
def test_reload_changes_the_sample_rate_and_sigusr1_reopens_logs(lab):
    conf = os.path.join(lab.dir, "tcpcopyd.conf")
    write_config(conf, 100)
    lab.start_tcpcopyd(extra=["--config", conf, "--workers", "2"])
    master = lab.procs["tcpcopyd"].pid
    share, incomplete = copied_share(lab, requests=1000, per_connection=2)
    assert share == 1.0 and incomplete == 0

    write_config(conf, 20)
    os.kill(master, signal.SIGHUP)
    lab.wait_log("tcpcopyd", "reload: applied sample_rate=20")
    lab.wait_log("tcpcopyd", "worker applied the reloaded settings: sample_rate=20%", count=2)
    share, incomplete = copied_share(lab, requests=10000, per_connection=2)
    assert 0.18 <= share <= 0.22, share
    assert incomplete == 0

    # log to a file (live), rotate it, SIGUSR1: master and workers write to the new file
    logfile = os.path.join(lab.dir, "tcpcopyd-file.log")
    write_config(conf, 20, f'log = "{logfile}"\n')
    os.kill(master, signal.SIGHUP)
    wait_for(lambda: os.path.exists(logfile), 10, "the log file")
    os.rename(logfile, logfile + ".1")
    os.kill(master, signal.SIGUSR1)

    def logged(text: str) -> bool:
        try:
            with open(logfile) as f:
                return text in f.read()
        except FileNotFoundError:
            return False
    # the next reload only once the master has reopened (a SIGHUP sent while SIGUSR1 is
    # still pending would be delivered first: the kernel hands out lower numbers first)
    wait_for(lambda: logged("SIGUSR1: log files reopened"), 20, "the master to reopen")
    write_config(conf, 30, f'log = "{logfile}"\n')
    os.kill(master, signal.SIGHUP)

    def reopened() -> bool:
        try:
            with open(logfile) as f:
                text = f.read()
        except FileNotFoundError:
            return False
        return ("reload: applied sample_rate=30" in text
                and text.count("worker applied the reloaded settings: sample_rate=30%") == 2)
    wait_for(reopened, 20, "master and both workers to log into the reopened file")
