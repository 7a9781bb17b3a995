"""IPv6 end to end in the dual-stack lab (fd18::/16 inside the lab's namespaces): real
clients over IPv6, and over both families at once through one daemon pair; the fixture
checks at the end that no packet of the target reached the client or the online host
(ip6tables counters beside the iptables ones) and that no rule of either is left."""
from __future__ import annotations

import collections
import subprocess
import sys

import orjson
import pytest

from tcpcopyd.lab import load
from tcpcopyd.lab.lab import MEMCACHED_PORT, wait_for
from tcpcopyd.lab.net import CLIENT6_IP, CLIENT_IP, ONLINE6_IP, ONLINE_IP, TARGET6_IP
from tests.lab.conftest import ctl_status, target_caught_up

pytestmark = pytest.mark.lab

IPV6 = {"ipv6": True}
ONLINE6 = f"[{ONLINE6_IP}]"


def requests_by_port(log, address: str | None = None):
    """(client address, client port, status, request length, uri) of every logged request
    (of ``address`` only, if given)."""
    return collections.Counter((f[0], f[1], f[2], f[3], f[6]) for f in log
                               if address is None or f[0] == address)


def totals(lab, name: str) -> dict:
    [status] = orjson.loads(ctl_status(f"{lab.ns.prefix}-{name}").stdout)
    return status["totals"]


@pytest.mark.parametrize("lab", [IPV6], indirect=True)
def test_short_connections_over_ipv6_lose_nothing(lab):
    r = load.h2load(lab, requests=3000, rate=500, host=ONLINE6)
    assert r.succeeded == 3000, r.output
    online = lab.nginx_log("online")
    assert {f[0] for f in online} == {CLIENT6_IP}
    target = target_caught_up(lab, 3000)
    assert requests_by_port(target) == requests_by_port(online)
    assert all(f[2] == "200" for f in target)
    assert totals(lab, "tcpcopyd")["not_followed"] == 0


@pytest.mark.parametrize("lab", [IPV6], indirect=True)
def test_both_families_at_once_through_one_daemon_pair(lab):
    four = subprocess.Popen(["ip", "netns", "exec", lab.ns.client, "h2load", "--h1", "-n",
                             "2000", "-c", "200", "-r", "2", "--rate-period", "10ms",
                             "-T", "30", "-H", "Connection: close", f"http://{ONLINE_IP}/"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    keepalive = load.paced_keepalive(lab, connections=50, per_connection=40, rate=400,
                                     host=ONLINE6_IP)
    try:
        assert load.parse_h2load(four.communicate(timeout=300)[0]).succeeded == 2000
        assert load.kv(keepalive.communicate(timeout=300)[0]) == {"ok": 2000, "errors": 0}
    finally:
        for p in (four, keepalive):
            if p.poll() is None:
                p.kill()
                p.wait()
    online = lab.nginx_log("online")
    target = target_caught_up(lab, 4000)
    for address in (CLIENT_IP, CLIENT6_IP):
        assert requests_by_port(target, address) == requests_by_port(online, address)
    assert all(f[2] == "200" for f in target)


@pytest.mark.parametrize("lab", [IPV6], indirect=True)
def test_memcached_over_ipv6(lab):
    out = load.python_in(lab, lab.ns.client, load.MEMCACHED_SETS, ONLINE6_IP, MEMCACHED_PORT,
                         3000, "six")
    assert load.kv(out.stdout) == {"sets": 3000, "failed": 0}, out.stderr

    def target_has_all() -> bool:
        got = load.python_in(lab, lab.ns.target, load.MEMCACHED_GET, "::1", MEMCACHED_PORT,
                             3000, "six")
        return load.kv(got.stdout).get("ok") == 3000
    wait_for(target_has_all, 60, "3000 keys in the target's memcached", interval=1.0)


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


@pytest.mark.parametrize("lab", [{**IPV6, "tcpcopyd": False}], indirect=True)
def test_an_ipv6_session_open_before_tcpcopyd_started_gets_a_fake_syn(lab):
    client = subprocess.Popen(["ip", "netns", "exec", lab.ns.client, sys.executable, "-c",
                               KEEPALIVE_CLIENT, ONLINE6_IP], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "ready"
        lab.start_tcpcopyd(ipv6=True)
        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "done bad=0"
    finally:
        client.kill()
        client.wait()
    target = target_caught_up(lab, 100)
    assert sorted(f[6] for f in target) == sorted(f"/?n={i}" for i in range(100))
    assert {f[0] for f in target} == {CLIENT6_IP} and all(f[2] == "200" for f in target)
    assert totals(lab, "tcpcopyd")["sessions_fake"] == 1


@pytest.mark.parametrize("lab", [{**IPV6, "tcpcopyd": False}], indirect=True)
def test_the_control_channel_over_ipv6_and_three_copies_of_each_session(lab):
    seen = lab.log_text("tcpcopyd").count("connected to interceptd")
    lab.stop("interceptd")
    lab.start_interceptd(extra=["--listen", "::"])
    lab.start_tcpcopyd(ipv6=True, server=f"[{TARGET6_IP}]", extra=["-n", "3"])
    assert lab.log_text("tcpcopyd").count("connected to interceptd") == seen + 1
    assert f"connected to interceptd [{TARGET6_IP}]:36524" in lab.log_text("tcpcopyd")
    r = load.h2load(lab, requests=500, rate=250, host=ONLINE6)
    assert r.succeeded == 500, r.output
    target = target_caught_up(lab, 1500)
    assert len(target) == 1500 and all(f[2] == "200" for f in target)
    # each copy from a port of its own, every request three times
    assert len({f[1] for f in target}) == 1500
    assert collections.Counter(f[6] for f in target) == {"/": 1500}
