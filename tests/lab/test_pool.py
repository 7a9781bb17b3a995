"""Worker pools (2 workers per side): both carry traffic, a killed worker is
replaced within a second and its sessions go on, SIGTERM under load stops cleanly."""
from __future__ import annotations

import os
import signal
import time

import orjson
import psutil
import pytest

from tcpcopyd.lab import load
from tcpcopyd.lab.lab import wait_for
from tests.lab.conftest import ctl_status, target_caught_up

pytestmark = pytest.mark.lab


def status(lab, name: str) -> dict:
    [d] = orjson.loads(ctl_status(f"{lab.ns.prefix}-{name}").stdout)
    return d


def workers(lab, name: str) -> list[int]:
    return sorted(c.pid for c in psutil.Process(lab.procs[name].pid).children())


@pytest.mark.parametrize("lab", [{"memcached": False, "workers": 2}], indirect=True)
def test_every_worker_carries_traffic(lab):
    r = load.h2load(lab, requests=10000, rate=1000)
    assert r.succeeded == 10000
    assert len(target_caught_up(lab, 10000)) == 10000
    for name, counter in (("tcpcopyd", "captured"), ("interceptd", "queued")):
        per_worker = [w["counters"][counter] for w in status(lab, name)["workers"]]
        assert len(per_worker) == 2
        assert min(per_worker) >= 0.2 * sum(per_worker), (name, per_worker)


def kill_worker_under_keepalive_load(lab, name: str) -> None:
    total = 10000
    client = load.paced_keepalive(lab, connections=100, per_connection=total // 100, rate=1000)
    try:
        wait_for(lambda: len(lab.nginx_log("online")) >= 3000, 60, "3000 requests online")
        before = workers(lab, name)
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        wait_for(lambda: len(workers(lab, name)) == 2 and victim not in workers(lab, name), 5,
                 "a new worker")
        respawn = time.monotonic() - t0
        out, _ = client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert load.kv(out) == {"ok": total, "errors": 0}, out
    assert respawn < 1.0, respawn
    target = target_caught_up(lab, total, timeout=30)
    lost = total - sum(1 for f in target if f[2] == "200")
    print(f"{name} worker killed: respawned in {respawn:.3f}s, {lost} of {total} lost")
    assert lost <= total * 0.001, f"{lost} of {total} requests lost on the target"
    assert sum(w["restarts"] for w in status(lab, name)["workers"]) == 1


@pytest.mark.parametrize("lab", [{"memcached": False, "workers": 2}], indirect=True)
def test_killed_tcpcopyd_worker_loses_almost_nothing(lab):
    kill_worker_under_keepalive_load(lab, "tcpcopyd")
    assert status(lab, "tcpcopyd")["totals"]["sessions_restored"] > 0


@pytest.mark.parametrize("lab", [{"memcached": False, "workers": 2}], indirect=True)
def test_killed_interceptd_worker_loses_almost_nothing(lab):
    kill_worker_under_keepalive_load(lab, "interceptd")


@pytest.mark.parametrize("lab", [{"memcached": False, "workers": 2}], indirect=True)
@pytest.mark.parametrize("name", ["tcpcopyd", "interceptd"])
def test_sigterm_under_load_stops_within_five_seconds(lab, name):
    client = load.paced_keepalive(lab, connections=100, per_connection=50, rate=1000)
    try:
        wait_for(lambda: len(lab.nginx_log("online")) >= 1000, 60, "1000 requests online")
        pids = [lab.procs[name].pid, *workers(lab, name)]
        t0 = time.monotonic()
        rc = lab.stop(name, signal.SIGTERM, timeout=10)
        took = time.monotonic() - t0
    finally:
        client.kill()
        client.wait()
    assert rc == 0
    assert took < 5.0, took
    assert not [p for p in pids if psutil.pid_exists(p) and
                psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    # the fixture checks that no iptables rule and no shm segment is left
