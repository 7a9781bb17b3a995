"""Sessions open before tcpcopyd started, memcached, and interceptd going away."""
from __future__ import annotations

import collections
import subprocess
import sys

import orjson
import pytest

from tcpcopyd.lab import load
from tcpcopyd.lab.lab import MEMCACHED_PORT, wait_for
from tcpcopyd.lab.net import ONLINE_IP
from tests.lab.conftest import ctl_status, target_caught_up

pytestmark = pytest.mark.lab

KEEPALIVE_CLIENT = r'''
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], 80, timeout=30)
c.request("GET", "/?warmup"); r = c.getresponse(); r.read()
print("ready", flush=True)
sys.stdin.readline()
bad = 0
for i in range(100):
    c.request("GET", f"/?n={i}"); r = c.getresponse(); r.read(); bad += r.status != 200
print(f"done bad={bad}", flush=True)
'''


def keepalive_across_the_start(lab, host: str, **start) -> list[list[str]]:
    """A keep-alive connection to ``host`` opened before tcpcopyd starts (with ``start``),
    its 100 requests sent after: the target's log, which holds every one of them."""
    client = subprocess.Popen(["ip", "netns", "exec", lab.ns.client, sys.executable, "-c",
                               KEEPALIVE_CLIENT, host], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "ready"
        lab.start_tcpcopyd(**start)
        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "done bad=0"
    finally:
        client.kill()
        client.wait()
    target = target_caught_up(lab, 100)
    assert sorted(f[6] for f in target) == sorted(f"/?n={i}" for i in range(100))
    return target


@pytest.mark.parametrize("lab", [{"tcpcopyd": False}], indirect=True)
def test_keepalive_connection_opened_before_tcpcopyd_started(lab):
    target = keepalive_across_the_start(lab, ONLINE_IP)
    assert all(f[2] == "200" for f in target)
    [status] = orjson.loads(ctl_status(f"{lab.ns.prefix}-tcpcopyd").stdout)
    assert status["totals"]["sessions_fake"] == 1


def test_memcached_sets_reach_the_target(lab):
    out = load.python_in(lab, lab.ns.client, load.MEMCACHED_SETS, ONLINE_IP, MEMCACHED_PORT,
                         10000, "lab")
    assert load.kv(out.stdout) == {"sets": 10000, "failed": 0}, out.stderr

    def target_has_all() -> bool:
        got = load.python_in(lab, lab.ns.target, load.MEMCACHED_GET, "127.0.0.1",
                             MEMCACHED_PORT, 10000, "lab")
        return load.kv(got.stdout).get("ok") == 10000
    wait_for(target_has_all, 60, "10000 keys with their values in the target's memcached",
             interval=1.0)


def counters(lab) -> dict[str, int]:
    """the non-zero counters of both daemons, to say where something went"""
    from shm import segment as shmseg
    from tcpcopyd.health import status
    out = {}
    for name in ("tcpcopyd", "interceptd"):
        try:
            seg = shmseg.attach(f"{lab.ns.prefix}-{name}")
        except shmseg.SegmentError:
            continue
        out.update({f"{name}.{k}": v for k, v in status.totals(seg).items() if v})
        seg.close()
    return out


def test_interceptd_restart_under_load_loses_nothing(lab):
    """interceptd stops (its rules go with it) and comes back while clients keep going:
    tcpcopyd says so, reconnects, re-registers its sessions and resends what is pending."""
    n = 3000
    h2 = subprocess.Popen(["ip", "netns", "exec", lab.ns.client, "h2load", "--h1", "-H",
                           "Connection: close", "-n", str(n), "-c", str(n), "-r", "2",
                           "--rate-period", "10ms", f"http://{ONLINE_IP}/"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(lab.nginx_log("online")) >= 500, 60, "500 requests online")
        assert lab.stop("interceptd") == 0
        lab.wait_log("tcpcopyd", "reconnecting")
        served = len(lab.nginx_log("online"))
        wait_for(lambda: len(lab.nginx_log("online")) >= served + 300, 60,
                 "300 more requests online while interceptd is down")
        connected = lab.log_text("tcpcopyd").count("connected to interceptd")
        lab.start_interceptd()
        lab.wait_log("tcpcopyd", "connected to interceptd", count=connected + 1)
        out, _ = h2.communicate(timeout=120)
    finally:
        if h2.poll() is None:
            h2.kill()
            h2.wait()
    res = load.parse_h2load(out)
    assert res.succeeded == n and res.failed == res.errored == 0, out
    target = target_caught_up(lab, n, timeout=90)
    assert len(target) == n, counters(lab)
    assert all(f[2] == "200" for f in target)


@pytest.mark.parametrize("lab", [{"interceptd": False}], indirect=True)
def test_tcpcopyd_started_before_interceptd_catches_up(lab):
    lab.wait_log("tcpcopyd", "reconnecting")
    r = load.h2load(lab, requests=200, rate=200)
    assert r.succeeded == 200
    lab.start_interceptd()
    lab.wait_log("tcpcopyd", "connected to interceptd")
    target = target_caught_up(lab, 200, timeout=90)
    assert len(target) == 200


def test_keepalive_at_3000_per_second_with_client_ports_reused(lab):
    """100 000 requests, 10 per connection, from 1 000 client ports: each port carries
    about ten connections one after the other, every one of them copied whole. (At 5 000/s
    this 2-core machine no longer keeps up on some days — the release before this one lost
    2-3 % there too on 2026-12-02, out of order in the capture — so the claim tested is the
    port reuse, at a rate with room.)"""
    lab.ns.sysctl(lab.ns.client, {"net/ipv4/ip_local_port_range": "20000 20999",
                                  "net/ipv4/tcp_tw_reuse": "1"})
    r = load.h2load(lab, requests=100_000, rate=3000, per_connection=10)
    assert r.succeeded == 100_000, r.output
    online = collections.Counter(f[1] for f in lab.nginx_log("online"))
    assert sum(online.values()) == 100_000
    # 10 000 connections on at most 1 000 ports: each port carried several in turn
    assert len(online) <= 1000 and sum(n for n in online.values() if n > 10) > 50_000
    target = target_caught_up(lab, 100_000, timeout=120)
    assert len(target) == 100_000, counters(lab)
    assert collections.Counter(f[1] for f in target) == online


def target_connections(lab) -> int:
    """Connections the target's nginx holds from the clients' network (any state but
    LISTEN and TIME-WAIT: those still take its resources)."""
    out = lab.ns.run(lab.ns.target, ["ss", "-Htan", "sport", "= :80", "dst",
                                     "198.18.1.0/24"]).stdout
    return sum(1 for line in out.splitlines()
               if line.split()[:1] and line.split()[0] not in ("LISTEN", "TIME-WAIT"))


@pytest.mark.parametrize("lab", [{"memcached": False}], indirect=True)
def test_every_session_ends_by_freeing_the_targets_connection(lab):
    """Short connections end on the target with them; keep-alive connections still open
    when tcpcopyd stops are reset there (close_all): nothing is left half-open."""
    r = load.h2load(lab, requests=2000, rate=1000)
    assert r.succeeded == 2000, r.output
    assert len(target_caught_up(lab, 2000)) == 2000
    wait_for(lambda: target_connections(lab) == 0, 30,
             "the target to hold no connection of the short load")
    client = load.long_keepalive(lab, connections=30, interval=0.2)
    try:
        wait_for(lambda: target_connections(lab) == 30, 30, "30 copied keep-alive connections")
        assert lab.stop("tcpcopyd") == 0        # graceful: each session reset on the target
        wait_for(lambda: target_connections(lab) == 0, 10,
                 "the target to have freed every keep-alive connection")
    finally:
        client.kill()
        client.wait()
