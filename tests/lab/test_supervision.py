"""The arbiter: a killed or silent worker is replaced, tcpcopyctl sees it, a killed
interceptd's rules are cleaned by the next one."""
from __future__ import annotations

import os
import signal

import orjson
import psutil
import pytest

from tcpcopyd.lab import load
from tcpcopyd.lab.lab import wait_for
from tests.lab.conftest import ctl_status, target_caught_up

pytestmark = pytest.mark.lab


def worker_pid(lab, name: str) -> int:
    """The pid of worker 1 (as tcpcopyctl reports it)."""
    return status(lab, name)[1]["workers"][0]["pid"]


def status(lab, name: str) -> tuple[int, dict]:
    r = ctl_status(f"{lab.ns.prefix}-{name}")
    [d] = orjson.loads(r.stdout)
    return r.returncode, d


@pytest.mark.parametrize("lab", [{"memcached": False, "workers": 2}], indirect=True)
def test_killed_worker_is_replaced_and_status_shows_it(lab):
    rc, d = status(lab, "tcpcopyd")
    assert rc == 0 and d["healthy"]
    n = len(d["workers"])
    assert [w["title"].split(" [")[0] for w in d["workers"]] == \
        [f"tcpcopyd: worker {i + 1}/{n} cpu={w['cpu']}" for i, w in enumerate(d["workers"])]
    assert [w["cpus"] for w in d["workers"]] == [[w["cpu"]] for w in d["workers"]]
    old = worker_pid(lab, "tcpcopyd")
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: status(lab, "tcpcopyd")[1]["workers"][0]["restarts"] == 1, 10,
             "a restart in tcpcopyctl status")
    wait_for(lambda: status(lab, "tcpcopyd")[0] == 0, 10, "a healthy status again")
    assert worker_pid(lab, "tcpcopyd") != old
    lab.wait_log("tcpcopyd", "killed by SIGKILL")
    lab.wait_log("tcpcopyd", "connected to interceptd", count=n + 1)
    r = load.h2load(lab, requests=200, rate=200)
    assert r.succeeded == 200
    assert len(target_caught_up(lab, 200)) == 200


@pytest.mark.parametrize("lab", [{"memcached": False, "tcpcopyd": False}], indirect=True)
def test_silent_worker_is_killed_and_replaced(lab):
    old = worker_pid(lab, "interceptd")
    os.kill(old, signal.SIGSTOP)
    wait_for(lambda: status(lab, "interceptd")[0] == 1, 15, "tcpcopyctl to report it stale")
    lab.wait_log("interceptd", "silent for", timeout=30)
    wait_for(lambda: status(lab, "interceptd")[0] == 0, 15, "a healthy status again")
    assert worker_pid(lab, "interceptd") != old


@pytest.mark.parametrize("lab", [{"memcached": False, "tcpcopyd": False}], indirect=True)
def test_rules_of_a_killed_interceptd_are_removed_by_the_next(lab):
    def rules() -> tuple[int, int]:
        """(iptables, ip6tables) queue rules"""
        return tuple(lab.ns.run(lab.ns.target, [tables, "-S", "OUTPUT"]).stdout
                     .count("NFQUEUE") for tables in ("iptables", "ip6tables"))
    installed = rules()
    assert installed[0] >= 2  # one per service port (and per queue selector with several)
    assert installed[1] == installed[0]
    p = lab.procs["interceptd"]
    for proc in [*psutil.Process(p.pid).children(), psutil.Process(p.pid)]:
        proc.kill()
    p.wait()
    assert rules() == installed  # left behind: fail-closed while nobody reads
    lab.procs.pop("interceptd")
    lab.start_interceptd()
    assert rules() == installed
    lab.wait_log("interceptd", f"removed {installed[0]} stale rule(s) tagged ")
    lab.wait_log("interceptd", f"removed {installed[1]} stale rule(s) tagged "
                 f"interceptd:{lab.ns.prefix}-interceptd (ip6tables)")


def test_status_exit_code_when_nothing_runs():
    r = ctl_status("no-such-instance")
    assert r.returncode == 3
    assert "no tcpcopyd or interceptd is running" in r.stderr


def capabilities_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)


@pytest.mark.parametrize("lab", [{"memcached": False, "workers": 2}], indirect=True)
def test_workers_keep_only_the_capabilities_they_need(lab):
    net_admin = 1 << 12
    for name, kept in (("tcpcopyd", 0), ("interceptd", net_admin)):
        master = psutil.Process(lab.procs[name].pid)
        workers = master.children()
        assert len(workers) == 2
        # a worker gives them up at the end of its boot (the fixture waited for one only)
        wait_for(lambda ws=workers, k=kept: [capabilities_of(w.pid) for w in ws] == [k, k],
                 20, f"{name}'s workers to keep only {kept:#x}")
        assert capabilities_of(master.pid) & net_admin      # the master keeps its own


@pytest.mark.parametrize("lab", [{"memcached": False, "interceptd": False}], indirect=True)
def test_workers_die_with_a_master_killed_by_sigkill(lab):
    master = psutil.Process(lab.procs["tcpcopyd"].pid)
    workers = master.children()
    master.kill()
    lab.procs["tcpcopyd"].wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, [p.pid for p in alive]
    lab.procs.pop("tcpcopyd")
    # the segment it left is taken over by the next one (the fixture checks it is removed)
    lab.start_tcpcopyd(wait_connected=False)
