"""Operator-facing options of the daemons, in the lab: log file, pid file, config file,
interceptd with rules managed by the operator."""
from __future__ import annotations

import os

import pytest

from tcpcopyd.lab import load
from tcpcopyd.lab.lab import bin_path
from tcpcopyd.lab.net import CLIENT6_IP, CLIENT_IP, ONLINE6_IP, ONLINE_IP, TARGET_IP
from tests.lab.conftest import target_caught_up

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("lab", [{"tcpcopyd": False, "memcached": False}], indirect=True)
def test_log_file_pid_file_and_config_file(lab):
    conf = os.path.join(lab.dir, "tcpcopyd.conf")
    logf = os.path.join(lab.dir, "copy.log")
    pidf = os.path.join(lab.dir, "copy.pid")
    with open(conf, "w") as f:
        f.write(f'[default]\ntransfer = "80-{TARGET_IP}:80"\nserver = "{TARGET_IP}"\n'
                f'interface = "eth0"\ntimeout = 30\n')
    p = lab.start("tcpcopyd", lab.ns.online,
                  [bin_path("tcpcopyd"), "--config", conf, "-l", logf, "-P", pidf,
                   "--instance", f"{lab.ns.prefix}-tcpcopyd"])

    def logged(text):
        with open(logf) as f:
            return text in f.read()
    from tcpcopyd.lab.lab import wait_for
    wait_for(lambda: os.path.exists(logf) and logged("connected to interceptd"), 20,
             "tcpcopyd to log to its file")
    with open(pidf) as f:
        assert int(f.read()) == p.pid
    assert lab.log_text("tcpcopyd") == ""  # nothing on stderr
    r = load.h2load(lab, requests=100, rate=100)
    assert r.succeeded == 100
    assert len(target_caught_up(lab, 100)) == 100
    assert lab.stop("tcpcopyd") == 0
    assert not os.path.exists(pidf)


@pytest.mark.parametrize("lab", [{"interceptd": False, "tcpcopyd": False, "memcached": False}],
                         indirect=True)
def test_interceptd_with_operator_managed_rules(lab):
    rule = ["-p", "tcp", "--sport", "80", "-j", "NFQUEUE", "--queue-num", "3"]
    lab.ns.run(lab.ns.target, ["iptables", "-w", "5", "-I", "OUTPUT", *rule])
    try:
        lab.start_interceptd([80], extra=["--no-iptables", "--queue-num", "3"])
        rules = lab.ns.run(lab.ns.target, ["iptables", "-S", "OUTPUT"]).stdout
        assert rules.count("NFQUEUE") == 1  # only the operator's
        lab.start_tcpcopyd([80])
        r = load.h2load(lab, requests=300, rate=300)
        assert r.succeeded == 300
        assert len(target_caught_up(lab, 300)) == 300
        assert lab.stop("tcpcopyd") == 0
        assert lab.stop("interceptd") == 0
        rules = lab.ns.run(lab.ns.target, ["iptables", "-S", "OUTPUT"]).stdout
        assert rules.count("NFQUEUE") == 1  # left in place for its owner
    finally:
        lab.ns.run(lab.ns.target, ["iptables", "-w", "5", "-D", "OUTPUT", *rule], check=False)


@pytest.mark.parametrize("lab", [{"tcpcopyd": False, "memcached": False}], indirect=True)
def test_several_interceptds_one_of_them_down(lab):
    lab.start_tcpcopyd([80], extra=["-s", f"{TARGET_IP},{TARGET_IP}:36599"])
    lab.wait_log("tcpcopyd", "interceptd 198.18.2.2:36599: Connection refused")
    r = load.h2load(lab, requests=200, rate=200)
    assert r.succeeded == 200
    assert len(target_caught_up(lab, 200)) == 200


@pytest.mark.parametrize("lab", [{"tcpcopyd": False, "memcached": False}], indirect=True)
def test_the_seed_command_form(lab):
    """tcpcopy's first form, LOCAL_IP LOCAL_PORT REMOTE_IP REMOTE_PORT: the rule, interceptd
    at the remote address and the interface holding the local address, with no flag."""
    lab.start("tcpcopyd", lab.ns.online,
              [bin_path("tcpcopyd"), ONLINE_IP, "80", TARGET_IP, "80",
               "--instance", f"{lab.ns.prefix}-tcpcopyd"])
    lab.wait_log("tcpcopyd", f"on eth0 -> interceptd {TARGET_IP}:36524")
    lab.wait_log("tcpcopyd", "connected to interceptd")
    r = load.h2load(lab, requests=200, rate=200)
    assert r.succeeded == 200
    assert len(target_caught_up(lab, 200)) == 200
    assert lab.stop("tcpcopyd") == 0


@pytest.mark.parametrize("lab", [{"interceptd": False, "tcpcopyd": False, "memcached": False,
                                  "ipv6": True}], indirect=True)
def test_operator_managed_rules_without_ipv6_ones_take_no_ipv6_session(lab):
    """--no-iptables with iptables rules only: interceptd does not take IPv6 sessions (their
    replies would reach the clients); with the operator's ip6tables rule in place it does."""
    rule = ["-p", "tcp", "--sport", "80", "-j", "NFQUEUE", "--queue-num", "3"]
    installed: list[str] = []
    try:
        lab.ns.run(lab.ns.target, ["iptables", "-w", "5", "-I", "OUTPUT", *rule])
        installed.append("iptables")
        lab.start_interceptd([80], extra=["--no-iptables", "--queue-num", "3"])
        lab.wait_log("interceptd", "IPv6 sessions refused: no ip6tables OUTPUT rule queues "
                     "the replies of port(s) 80 to NFQUEUE 3..3")
        lab.start_tcpcopyd([80], ipv6=True)
        r = load.h2load(lab, requests=200, rate=200, host=f"[{ONLINE6_IP}]")
        assert r.succeeded == 200
        lab.wait_log("tcpcopyd", "does not take IPv6 sessions")
        r = load.h2load(lab, requests=200, rate=200)
        assert r.succeeded == 200
        target = target_caught_up(lab, 200)
        assert {f[0] for f in target} == {CLIENT_IP}   # no IPv6 copy was sent
        assert lab.stop("tcpcopyd") == 0
        assert lab.stop("interceptd") == 0

        lab.ns.run(lab.ns.target, ["ip6tables", "-w", "5", "-I", "OUTPUT", *rule])
        installed.append("ip6tables")
        lab.start_interceptd([80], extra=["--no-iptables", "--queue-num", "3"])
        lab.wait_log("interceptd", "IPv4 and IPv6, control")
        lab.start_tcpcopyd([80], ipv6=True)
        r = load.h2load(lab, requests=200, rate=200, host=f"[{ONLINE6_IP}]")
        assert r.succeeded == 200
        target = target_caught_up(lab, 400)
        assert sum(f[0] == CLIENT6_IP for f in target) == 200
    finally:
        for tool in installed:
            lab.ns.run(lab.ns.target, [tool, "-w", "5", "-D", "OUTPUT", *rule], check=False)
