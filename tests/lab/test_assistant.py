"""interceptd's assistant mode: the target routes the replies for the clients to another
host, which does not forward them; interceptd there captures them (AF_PACKET fanout
workers, no NFQUEUE, no iptables) and feeds them back. The core figures hold."""
from __future__ import annotations

import collections

import pytest

from tcpcopyd.lab import load
from tests.lab.conftest import target_caught_up

pytestmark = pytest.mark.lab

ASSISTANT = {"assistant": True}


@pytest.mark.parametrize("lab", [ASSISTANT], indirect=True)
def test_short_and_keepalive_http_through_an_assistant(lab):
    title = lab.ns.run(lab.ns.assistant, ["ps", "-eo", "args="]).stdout
    assert "interceptd: worker 1/" in title and "capture=eth0" in title
    rules = lab.ns.run(lab.ns.assistant, ["iptables", "-w", "5", "-S", "OUTPUT"]).stdout
    assert "NFQUEUE" not in rules
    r = load.h2load(lab, requests=20000, rate=1000)
    assert r.succeeded == 20000, r.output
    r = load.h2load(lab, requests=10000, rate=1000, per_connection=10)
    assert r.succeeded == 10000, r.output
    target = target_caught_up(lab, 30000)
    assert len(target) == 30000
    assert all(f[2] == "200" for f in target)
    online = lab.nginx_log("online")
    assert collections.Counter((f[1], f[3]) for f in target) == \
        collections.Counter((f[1], f[3]) for f in online)


@pytest.mark.parametrize("lab", [ASSISTANT], indirect=True)
def test_doctor_on_the_assistant_host(lab):
    from tcpcopyd.lab.lab import bin_path
    args = [bin_path("tcpcopyctl"), "doctor", "interceptd", "--service-port", "80",
            "-i", "eth0"]
    r = lab.ns.run(lab.ns.assistant, args, check=False, timeout=60)
    assert r.returncode == 0, r.stdout
    assert "OK    no forwarding: " in r.stdout and "OK    assistant interface: " in r.stdout
    lab.ns.sysctl(lab.ns.assistant, {"net/ipv4/ip_forward": "1"})
    try:
        r = lab.ns.run(lab.ns.assistant, args, check=False, timeout=60)
        assert r.returncode == 1
        assert "FAIL  no forwarding: this host forwards IPv4" in r.stdout
        assert "fix: sysctl -w net.ipv4.ip_forward=0" in r.stdout
    finally:
        lab.ns.sysctl(lab.ns.assistant, {"net/ipv4/ip_forward": "0"})
