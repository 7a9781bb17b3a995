"""Fail-closed (#19): no reply of the target reaches a client or the online host, whatever
interceptd does — stopped, killed with SIGKILL, restarted, not started yet — and tcpcopyd
finds each new interceptd by itself. The lab routes the target's replies back through the
online host to the clients (as a real network would: no dead end), with counters on
both."""
from __future__ import annotations

import signal
import threading

import pytest

from tcpcopyd.lab import load
from tests.lab.conftest import target_caught_up

pytestmark = pytest.mark.lab

NO_INTERCEPTD = {"interceptd": False, "memcached": False}   # tcpcopyd starts alone


def guard_rules(lab) -> list[str]:
    out = lab.ns.run(lab.ns.target, ["iptables", "-w", "5", "-S", "OUTPUT"]).stdout
    return [line for line in out.splitlines() if "interceptd-guard:" in line]


def nfqueue_rules(lab) -> list[str]:
    out = lab.ns.run(lab.ns.target, ["iptables", "-w", "5", "-S", "OUTPUT"]).stdout
    return [line for line in out.splitlines() if "NFQUEUE" in line]


def test_the_leak_counters_count_a_reply_let_through(lab):
    """What makes every other lab test's "nothing leaked" able to fail."""
    lab.ns.run(lab.ns.target, ["iptables", "-w", "5", "-I", "OUTPUT", "1", "-p", "tcp",
                               "--sport", "80", "-j", "ACCEPT"])
    try:
        r = load.h2load(lab, requests=20, rate=100)
        assert r.succeeded == 20, r.output
        target_caught_up(lab, 20)
        leaked = lab.ns.leaked()
        assert leaked[lab.ns.online] > 0 and leaked[lab.ns.client] > 0, leaked
    finally:
        lab.ns.run(lab.ns.target, ["iptables", "-w", "5", "-D", "OUTPUT", "-p", "tcp",
                                   "--sport", "80", "-j", "ACCEPT"])
        lab.ns.reset_leak_counters()


def restart_under_load(lab, how: int) -> None:
    """interceptd ended with ``how`` (SIGTERM: a clean stop; SIGKILL) in the middle of a
    short-connection load, then started again while the load goes on."""
    result = {}
    t = threading.Thread(target=lambda: result.update(
        r=load.h2load(lab, requests=3000, rate=500)))
    t.start()
    try:
        lab.wait_log("tcpcopyd", "connected to interceptd")
        target_caught_up(lab, len(lab.nginx_log("target")) + 200)   # copying under way
        down = lab.log_text("tcpcopyd").count("replication continues")
        lab.stop("interceptd", how)
        if how == signal.SIGTERM:
            # the queue rules went with it; the guard stays and drops the replies
            assert not nfqueue_rules(lab) and guard_rules(lab)
        lab.wait_log("tcpcopyd", "replication continues, reconnecting", count=down + 1)
        # the load goes on for a while with no interceptd at all
        load.h2load(lab, requests=200, rate=200)
        lab.start_interceptd()
        lab.wait_workers_connected(f"{lab.ns.prefix}-tcpcopyd")
    finally:
        t.join()
    assert result["r"].succeeded == 3000, result["r"].output
    assert set(lab.ns.leaked().values()) == {0}, lab.ns.leaked()


def test_no_reply_escapes_while_interceptd_is_stopped_killed_or_restarted(lab):
    for how in (signal.SIGTERM, signal.SIGKILL):
        restart_under_load(lab, how)
    # the new interceptd copies the next load whole
    r = load.h2load(lab, requests=1000, rate=500, path="/?after=1")
    assert r.succeeded == 1000, r.output
    log = target_caught_up(lab, len(lab.nginx_log("target")) + 1000)
    assert sum(1 for f in log if f[6] == "/?after=1" and f[2] == "200") == 1000
    assert set(lab.ns.leaked().values()) == {0}, lab.ns.leaked()
    assert len(guard_rules(lab)) == 2            # one per service port (80, 11211)


@pytest.mark.parametrize("lab", [NO_INTERCEPTD], indirect=True)
def test_tcpcopyd_started_first_sends_no_syn_until_interceptd_is_there(lab):
    r = load.h2load(lab, requests=300, rate=300)
    assert r.succeeded == 300, r.output
    assert lab.nginx_log("target") == []         # no SYN went: nothing reached the target
    assert set(lab.ns.leaked().values()) == {0}, lab.ns.leaked()
    lab.start_interceptd()
    lab.wait_workers_connected(f"{lab.ns.prefix}-tcpcopyd")
    r = load.h2load(lab, requests=500, rate=500, path="/?after=1")
    assert r.succeeded == 500, r.output
    log = target_caught_up(lab, len(lab.nginx_log("target")) + 500)
    assert sum(1 for f in log if f[6] == "/?after=1" and f[2] == "200") == 500
