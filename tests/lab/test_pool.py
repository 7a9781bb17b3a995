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


def pool_places(lab) -> list[str]:
    """Each tcpcopyd worker index's place in the pool: serving, retiring or parked."""
    return [w["pool"] for w in status(lab, "tcpcopyd")["workers"]]


@pytest.mark.parametrize("lab", [{"memcached": False, "tcpcopyd": False}], indirect=True)
def test_an_auto_pool_grows_and_shrinks_and_every_session_goes_on(lab):
    """workers = auto: a load that keeps the worker busy adds a second one, and once it is
    gone the second retires. Sessions opened before the growth, and sessions the second
    worker opened and still held when it retired, go on to their end: their packets that
    the other worker captures are handed to the worker holding them, and no request is
    lost on the way."""
    lab.start_tcpcopyd(extra=["--workers", "auto", "--grow-at", "10", "--shrink-at", "5",
                              "--shrink-after", "3"])
    assert pool_places(lab) == ["serving", "parked"]
    early = load.long_keepalive(lab, connections=20, interval=0.5)
    late = None
    try:
        wait_for(lambda: len(lab.nginx_log("online")) >= 100, 30, "the early sessions")
        busy = load.paced_keepalive(lab, connections=100, per_connection=300, rate=2500)
        wait_for(lambda: pool_places(lab) == ["serving", "serving"], 60,
                 "a second worker in the pool")
        # sessions that open now are spread over both workers
        late = load.long_keepalive(lab, connections=20, interval=0.5)
        out, _ = busy.communicate(timeout=120)
        assert load.kv(out) == {"ok": 30000, "errors": 0}, out
        wait_for(lambda: pool_places(lab)[1] == "retiring", 60, "the second worker retiring")
        # the retiring worker still holds late sessions: the first hands it their packets
        held = status(lab, "tcpcopyd")["workers"][1]["counters"]["sessions_active"]
        assert held > 0
        time.sleep(2)     # requests of the sessions it holds, handed to it
        for clients in (early, late):
            clients.send_signal(signal.SIGUSR1)
        outs = [clients.communicate(timeout=60)[0] for clients in (early, late)]
        wait_for(lambda: pool_places(lab) == ["serving", "parked"], 60,
                 "the retired worker parked")
    finally:
        print("\n".join(line for line in lab.log_text("tcpcopyd").splitlines()
                        if "pool" in line or "retir" in line))
        for clients in (early, late):
            if clients is not None and clients.poll() is None:
                clients.kill()
                clients.wait()
    for out in outs:
        assert load.kv(out)["errors"] == 0 and load.kv(out)["final"] == 20, out
    online = len(lab.nginx_log("online"))
    target = target_caught_up(lab, online, timeout=30)
    totals = status(lab, "tcpcopyd")["totals"]
    print(f"{online} requests online, {len(target)} at the target; handed "
          f"{totals['strays_handed']}, taken {totals['strays_taken']}, lost "
          f"{totals['strays_lost']}")
    assert len(target) == online
    assert totals["strays_handed"] == totals["strays_taken"] > 0
    assert totals["strays_lost"] == 0
    assert totals["sessions_fake"] == 0     # no session was opened twice
