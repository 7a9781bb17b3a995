"""`tcpcopyctl doctor` in the lab: the healthy lab passes on both hosts, and each broken
set-up it knows is reported FAIL with its fix."""
from __future__ import annotations

import subprocess

import pytest

from tcpcopyd.lab.lab import bin_path
from tcpcopyd.lab.net import CLIENT6_IP, CLIENT_IP, CLIENT_NET, DEAD_END_IP, TARGET_IP

pytestmark = pytest.mark.lab

ONLINE_ARGS = ["tcpcopyd", "-x", f"80-{TARGET_IP}:80,11211-{TARGET_IP}:11211", "-s", TARGET_IP,
               "-i", "eth0"]
TARGET_ARGS = ["--client", CLIENT_IP, "interceptd", "--service-port", "80,11211"]
STOPPED = {"interceptd": False, "tcpcopyd": False}


def doctor(lab, ns: str, args: list[str]) -> subprocess.CompletedProcess:
    return lab.ns.run(ns, [bin_path("tcpcopyctl"), "doctor", *args], check=False, timeout=60)


def failed(r: subprocess.CompletedProcess) -> dict[str, str]:
    """check name -> its detail and fix lines, for the checks that failed"""
    out: dict[str, str] = {}
    name = None
    for line in r.stdout.splitlines():
        if line.startswith("FAIL "):
            name, _, detail = line[6:].partition(": ")
            out[name] = (out[name] + "\n" if name in out else "") + detail
        elif line.startswith("      fix: ") and name:
            out[name] += "\n" + line.strip()
        else:
            name = None
    return out


def test_healthy_lab_passes_on_both_hosts(lab):
    r = doctor(lab, lab.ns.target, ["--client", f"{CLIENT_IP},{CLIENT6_IP}", *TARGET_ARGS[2:]])
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("privileges", "return route", "rp_filter", "nfqueue rule", "nfqueue reader",
                 "control port", "protocol version", "nfqueue rule (IPv6)"):
        assert f"OK    {name}: " in r.stdout, (name, r.stdout)
    assert f"OK    return route: replies to {CLIENT6_IP} leave via " in r.stdout, r.stdout
    r = doctor(lab, lab.ns.online, ONLINE_ARGS)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("interface", "target route", "control port", "protocol version"):
        assert f"OK    {name}: " in r.stdout, (name, r.stdout)


def test_strict_rp_filter_against_the_return_route(lab):
    t = lab.ns.target
    # replies to the clients leave through a dead-end interface, copies arrive on eth0
    lab.ns.run(t, ["ip", "link", "add", "dead0", "type", "veth", "peer", "name", "dead1"])
    for link in ("dead0", "dead1"):
        lab.ns.run(t, ["ip", "link", "set", link, "up"])
    lab.ns.run(t, ["ip", "route", "replace", CLIENT_NET, "dev", "dead0"])
    lab.ns.run(t, ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1",
                   "net.ipv4.conf.eth0.rp_filter=1"])
    r = doctor(lab, t, TARGET_ARGS)
    assert r.returncode == 1
    assert list(failed(r)) == ["rp_filter"], r.stdout
    detail = failed(r)["rp_filter"]
    assert "strict rp_filter on dead1, eth0: copies from the clients arriving there are " \
           "dropped, their return route leaves via dead0" in detail
    assert "fix: sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.dead1.rp_filter=2 " \
           "net.ipv4.conf.eth0.rp_filter=2" in detail
    lab.ns.run(t, ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=2",
                   "net.ipv4.conf.eth0.rp_filter=2", "net.ipv4.conf.dead1.rp_filter=2"])
    assert doctor(lab, t, TARGET_ARGS).returncode == 0


def test_missing_return_route(lab):
    lab.ns.run(lab.ns.target, ["ip", "route", "del", CLIENT_NET])
    r = doctor(lab, lab.ns.target, TARGET_ARGS)
    assert r.returncode == 1
    assert list(failed(r)) == ["return route"], r.stdout
    assert "no route to the client" in failed(r)["return route"]
    assert f"fix: ip route add {CLIENT_NET} via DEAD_END" in failed(r)["return route"]
    lab.ns.run(lab.ns.target, ["ip", "route", "add", CLIENT_NET, "via", DEAD_END_IP])
    assert doctor(lab, lab.ns.target, TARGET_ARGS).returncode == 0


@pytest.mark.parametrize("lab", [STOPPED], indirect=True)
def test_missing_nfqueue_rule(lab):
    lab.start_interceptd(extra=["--no-iptables"])
    r = doctor(lab, lab.ns.target, TARGET_ARGS)
    assert r.returncode == 1
    assert list(failed(r)) == ["nfqueue rule"], r.stdout
    assert "no NFQUEUE rule takes the replies of port 80:" in failed(r)["nfqueue rule"]
    assert "no NFQUEUE rule takes the replies of port 11211:" in failed(r)["nfqueue rule"]
    assert "iptables -I OUTPUT -p tcp --sport 80" in failed(r)["nfqueue rule"]


@pytest.mark.parametrize("lab", [STOPPED], indirect=True)
def test_interceptd_down(lab):
    t = lab.ns.target
    r = doctor(lab, t, TARGET_ARGS)
    assert r.returncode == 1
    assert set(failed(r)) == {"nfqueue rule", "control port"}, r.stdout
    assert "start interceptd" in failed(r)["control port"]
    r = doctor(lab, lab.ns.online, ONLINE_ARGS)
    assert r.returncode == 1
    assert list(failed(r)) == ["control port"], r.stdout
    assert f"start interceptd on {TARGET_IP}" in failed(r)["control port"]
    # a rule left behind with nobody reading its queue
    rule = ["OUTPUT", "-p", "tcp", "--sport", "80", "-j", "NFQUEUE", "--queue-num", "0"]
    lab.ns.run(t, ["iptables", "-w", "5", "-I", *rule])
    try:
        r = doctor(lab, t, ["--client", CLIENT_IP, "interceptd", "--service-port", "80"])
        assert "nfqueue reader" in failed(r), r.stdout
        assert "nobody reads NFQUEUE 0" in failed(r)["nfqueue reader"]
    finally:
        lab.ns.run(t, ["iptables", "-w", "5", "-D", *rule])
