"""Who the target sees: -n copies of every session, two instances with their own -f port
blocks, and a -c client-address pool; counts from the servers' own logs."""
from __future__ import annotations

import collections
import concurrent.futures
import ipaddress

import pytest

from shm import segment as shmseg
from tcpcopyd.health import status
from tcpcopyd.lab import load
from tcpcopyd.lab.lab import command, wait_for
from tcpcopyd.lab.net import (
    CLIENT2_IP,
    CLIENT_IP,
    DEAD_END_IP,
    ONLINE2_IP,
    TARGET2_IP,
    TARGET_IP,
)
from tcpcopyd.online.rewrite import BLOCK_SIZE, FIRST_PORT
from tests.lab.conftest import target_caught_up

pytestmark = pytest.mark.lab

NO_TCPCOPYD = {"tcpcopyd": False, "memcached": False}


def totals(lab, name: str = "tcpcopyd") -> dict[str, int]:
    seg = shmseg.attach(f"{lab.ns.prefix}-{name}")
    try:
        return status.totals(seg)
    finally:
        seg.close()


def in_block(port: str, block: int) -> bool:
    start = FIRST_PORT + block * BLOCK_SIZE
    return start <= int(port) < start + BLOCK_SIZE


@pytest.mark.parametrize("lab", [NO_TCPCOPYD], indirect=True)
def test_three_copies_of_every_session(lab):
    lab.start_tcpcopyd(ports=[80], extra=["-n", "3"])
    r = load.h2load(lab, requests=3000, rate=1000)
    assert r.succeeded == 3000, r.output
    target = target_caught_up(lab, 9000)
    assert len(target) == 9000
    assert all(f[2] == "200" for f in target)
    assert all(in_block(f[1], 0) for f in target)
    # the workers publish their counters every 0.1 s: the last ones may not be out yet
    wait_for(lambda: totals(lab)["sessions_opened"] >= 9000, 10, "9000 sessions counted")
    c = totals(lab)
    assert c["sessions_target_rst"] == 0 and c["sessions_refused"] == 0, c
    assert c["sessions_opened"] == 9000


@pytest.mark.parametrize("lab", [NO_TCPCOPYD], indirect=True)
def test_two_instances_with_their_own_port_blocks(lab):
    lab.start_tcpcopyd(ports=[80], extra=["-f", "1"])
    lab.start("tcpcopyd2", lab.ns.online,
              [*command("tcpcopyd"), "-x", f"80-{TARGET_IP}:80", "-s", TARGET_IP, "-i", "eth0",
               "--instance", f"{lab.ns.prefix}-tcpcopyd2", "-f", "2"])
    try:
        lab.wait_log("tcpcopyd2", "connected to interceptd")
        r = load.h2load(lab, requests=2000, rate=1000)
        assert r.succeeded == 2000, r.output
        target = target_caught_up(lab, 4000)
        assert len(target) == 4000
        blocks = collections.Counter(1 if in_block(f[1], 1) else 2 if in_block(f[1], 2)
                                     else None for f in target)
        assert blocks == {1: 2000, 2: 2000}
        for name in ("tcpcopyd", "tcpcopyd2"):
            wait_for(lambda n=name: totals(lab, n)["sessions_opened"] >= 2000, 10,
                     f"2000 sessions counted by {name}")
            c = totals(lab, name)
            assert c["sessions_target_rst"] == 0 and c["sessions_opened"] == 2000, (name, c)
    finally:
        assert lab.stop("tcpcopyd2") == 0


@pytest.mark.parametrize("lab", [NO_TCPCOPYD], indirect=True)
def test_client_address_pool(lab):
    pool = ipaddress.ip_network("198.18.6.0/24")
    # the target routes the pool, like the clients, to the dead end
    lab.ns.run(lab.ns.target, ["ip", "route", "add", str(pool), "via", DEAD_END_IP])
    lab.start_tcpcopyd(ports=[80], extra=["-c", "198.18.6.x"])
    r = load.h2load(lab, requests=2000, rate=1000, per_connection=2)
    assert r.succeeded == 2000, r.output
    target = target_caught_up(lab, 2000)
    assert len(target) == 2000
    assert all(ipaddress.ip_address(f[0]) in pool for f in target)
    assert all(f[2] == "200" for f in target)
    # every copied session complete: two requests from each (address, port)
    assert set(collections.Counter((f[0], f[1]) for f in target).values()) == {2}


@pytest.mark.parametrize("lab", [{**NO_TCPCOPYD, "second_online": True}], indirect=True)
def test_two_online_hosts_copied_to_one_target(lab):
    """Each online host has its own clients and its own tcpcopyd; one interceptd serves both:
    the target serves the sum, nothing lost, at 1 000 req/s per host."""
    lab.start_tcpcopyd(ports=[80])
    lab.start("tcpcopyd2", lab.ns.online2,
              [*command("tcpcopyd"), "-x", f"80-{TARGET2_IP}:80", "-s", TARGET2_IP, "-i",
               "eth0", "--instance", f"{lab.ns.prefix}-tcpcopyd2"])
    try:
        lab.wait_log("tcpcopyd2", "connected to interceptd")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(load.h2load, lab, requests=10000, rate=1000)
            second = pool.submit(load.h2load, lab, requests=10000, rate=1000,
                                 ns=lab.ns.client2, host=ONLINE2_IP)
            assert first.result().succeeded == 10000, first.result().output
            assert second.result().succeeded == 10000, second.result().output
        target = target_caught_up(lab, 20000)
        assert len(target) == 20000
        by_client = collections.Counter(f[0] for f in target)
        assert by_client == {CLIENT_IP: 10000, CLIENT2_IP: 10000}
        assert len(lab.nginx_log("online")) == len(lab.nginx_log("online2")) == 10000
    finally:
        assert lab.stop("tcpcopyd2") == 0
