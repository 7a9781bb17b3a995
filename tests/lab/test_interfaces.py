"""Capture on a set of interfaces (-i 'eth0,vethc*'), as on a node that hosts many pods:
the interfaces the set matches at start, and one created while tcpcopyd runs, are
captured; one that goes away is let go; a reload binds the rules to other online
addresses. The fixture checks that nothing leaked."""
from __future__ import annotations

import os
import signal

import pytest

from tcpcopyd.lab import load
from tcpcopyd.lab.net import CLIENT_IP, ONLINE_IP, ONLINE_TARGET_SIDE_IP, TARGET_IP
from tests.lab.conftest import daemon_status, target_caught_up

pytestmark = pytest.mark.lab

# a second link between the client and the online host, made while tcpcopyd runs
NEW_CLIENT_IP, NEW_ONLINE_IP, NEW_NET = "198.18.13.1", "198.18.13.2", "198.18.13.0/24"


def add_link(lab) -> None:
    """vethc1 on the online host, its peer eth5 on the client, 198.18.13.0/24; the target
    routes that network back through the online host, as the lab's first."""
    lab.ns.run(lab.ns.online, ["ip", "link", "add", "vethc1", "type", "veth", "peer",
                               "name", "eth5", "netns", lab.ns.client])
    for ns, dev, address in ((lab.ns.online, "vethc1", NEW_ONLINE_IP),
                             (lab.ns.client, "eth5", NEW_CLIENT_IP)):
        lab.ns.run(ns, ["ip", "addr", "add", f"{address}/24", "dev", dev])
        lab.ns.run(ns, ["ip", "link", "set", dev, "up"])
    lab.ns.run(lab.ns.target, ["ip", "route", "add", NEW_NET, "via", ONLINE_TARGET_SIDE_IP])


@pytest.mark.parametrize("lab", [{"tcpcopyd": False, "memcached": False}], indirect=True)
def test_a_set_of_interfaces_follows_one_that_appears_and_goes(lab):
    lab.start_tcpcopyd([80], extra=["-i", "eth0,vethc*"])
    r = load.h2load(lab, requests=500, rate=250)
    assert r.succeeded == 500, r.output
    assert len(target_caught_up(lab, 500)) == 500

    add_link(lab)
    lab.wait_log("tcpcopyd", "-i eth0,vethc*: vethc1 appeared; capturing on eth0, vethc1")
    r = load.h2load(lab, requests=500, rate=250, host=NEW_ONLINE_IP)
    assert r.succeeded == 500, r.output
    target = target_caught_up(lab, 1000)
    online = sorted((f[0], f[1]) for f in lab.nginx_log("online"))
    assert sorted((f[0], f[1]) for f in target) == online
    assert {f[0] for f in target} == {CLIENT_IP, NEW_CLIENT_IP}

    lab.ns.run(lab.ns.online, ["ip", "link", "del", "vethc1"])
    lab.wait_log("tcpcopyd", "-i eth0,vethc*: vethc1 went away; capturing on eth0")
    r = load.h2load(lab, requests=200, rate=200)
    assert r.succeeded == 200, r.output
    assert len(target_caught_up(lab, 1200)) == 1200
    assert daemon_status(lab)["totals"]["interface_down"] == 0


@pytest.mark.parametrize("lab", [{"tcpcopyd": False, "memcached": False}], indirect=True)
def test_a_set_that_matches_nothing_yet_starts_and_waits(lab):
    lab.start_tcpcopyd([80], extra=["-i", "vethc*"])
    lab.wait_log("tcpcopyd", "-i vethc* matches no interface yet")
    add_link(lab)
    lab.wait_log("tcpcopyd", "vethc1 appeared; capturing on vethc1")
    r = load.h2load(lab, requests=300, rate=150, host=NEW_ONLINE_IP)
    assert r.succeeded == 300, r.output
    target = target_caught_up(lab, 300)
    assert {f[0] for f in target} == {NEW_CLIENT_IP} and len(target) == 300


@pytest.mark.parametrize("lab", [{"tcpcopyd": False, "memcached": False}], indirect=True)
def test_a_reload_binds_the_rules_to_other_online_addresses(lab, tmp_path):
    """The online addresses of -x change with a reload, as a node's pods come and go: the
    requests to the address the rules name are copied, the others not."""
    add_link(lab)
    conf = tmp_path / "tcpcopyd.conf"

    def rules(online: str) -> None:
        conf.write_text(f'[default]\ntransfer = "{online}:80-{TARGET_IP}:80"\n'
                        f'server = "{TARGET_IP}"\ninterface = "eth0,vethc*"\n')
    rules(ONLINE_IP)
    lab.start("tcpcopyd", None, [*lab.command("tcpcopyd", lab.ns.online), "--config",
                                 str(conf), "--instance", f"{lab.ns.prefix}-tcpcopyd"])
    lab.wait_log("tcpcopyd", "connected to interceptd")
    lab.wait_workers_connected(f"{lab.ns.prefix}-tcpcopyd")
    for host in (ONLINE_IP, NEW_ONLINE_IP):
        assert load.h2load(lab, requests=200, rate=200, host=host).succeeded == 200
    target = target_caught_up(lab, 200)
    assert {f[0] for f in target} == {CLIENT_IP} and len(target) == 200

    rules(NEW_ONLINE_IP)
    os.kill(lab.procs["tcpcopyd"].pid, signal.SIGHUP)
    lab.wait_log("tcpcopyd", "worker applied the reloaded settings")
    for host in (ONLINE_IP, NEW_ONLINE_IP):
        assert load.h2load(lab, requests=200, rate=200, host=host).succeeded == 200
    target = target_caught_up(lab, 400)
    assert [f[0] for f in target[200:]] == [NEW_CLIENT_IP] * 200
    assert "needs a restart" not in lab.log_text("tcpcopyd")
