"""Mirror mode (issue #24) in the lab: the online host runs nothing of ours; it mirrors its
eth0 both ways with ``tc ... action mirred`` into a VXLAN device toward a mirror host,
whose VXLAN device in ``external`` mode (any VNI) is where tcpcopyd --mirror captures; the
copies and the control channel go from the mirror host to the target. The fixture checks
that no packet of the target reached the client or the online host."""
from __future__ import annotations

import collections
import concurrent.futures
import os
import subprocess

import orjson
import pytest

from tcpcopyd.lab import load
from tcpcopyd.lab.lab import command, wait_for
from tcpcopyd.lab.net import (
    CLIENT2_IP,
    CLIENT_IP,
    CLIENT_NET,
    MIRROR_DEVICE,
    ONLINE2_IP,
    ONLINE6_IP,
    ONLINE_IP,
    ONLINE_MIRROR_SIDE_IP,
    TARGET2_IP,
    TARGET_IP,
)
from tests.lab.conftest import daemon_status, target_caught_up
from tests.lab.test_long_transfers import MiB, assert_bodies_exact, drop_copies, upload
from tests.lab.test_sessions import keepalive_across_the_start

pytestmark = pytest.mark.lab

MIRROR = {"mirror": True, "memcached": False}


def short_and_keepalive(lab, short: int, connections: int) -> None:
    """``short`` short HTTP requests, then ``connections`` keep-alive connections of 50,
    every one answered online."""
    r = load.h2load(lab, requests=short, rate=500)
    assert r.succeeded == short, r.output
    keepalive = load.paced_keepalive(lab, connections=connections, per_connection=50,
                                     rate=400, host=ONLINE_IP)
    assert load.kv(keepalive.communicate(timeout=300)[0]) == {"ok": 50 * connections,
                                                              "errors": 0}


def nothing_of_ours_on_the_online_host(lab) -> None:
    pids = subprocess.run(["ip", "netns", "pids", lab.ns.online], capture_output=True,
                          text=True).stdout.split()
    names = {open(f"/proc/{p}/comm").read().strip() for p in pids if os.path.exists(
        f"/proc/{p}/comm")}
    assert names <= {"nginx"}, names


def requests_once(lab, n: int) -> None:
    """Every request the online nginx logged reached the target exactly once."""
    online = sorted((f[0], f[1], f[6]) for f in lab.nginx_log("online"))
    target = target_caught_up(lab, n)
    assert len(online) == n
    assert sorted((f[0], f[1], f[6]) for f in target) == online
    assert all(f[2] == "200" for f in target)


@pytest.mark.parametrize("lab", [MIRROR], indirect=True)
def test_short_and_keepalive_http_from_a_mirror(lab):
    nothing_of_ours_on_the_online_host(lab)
    short_and_keepalive(lab, 2000, 20)
    requests_once(lab, 3000)
    d = daemon_status(lab)
    t = d["totals"]
    assert t["mirror_duplicates"] == 0 and t["truncated"] == 0
    assert t["sessions_opened"] == 2020
    [source] = d["mirror_sources"]
    assert source["source"] == ONLINE_IP and source["packets"] == t["captured"]
    assert source["duplicates"] == source["truncated"] == 0


@pytest.mark.parametrize("lab", [MIRROR], indirect=True)
def test_every_packet_mirrored_twice_is_copied_once(lab):
    lab.ns.mirror_again(twice=True)
    short_and_keepalive(lab, 1000, 10)
    requests_once(lab, 1500)
    d = daemon_status(lab)
    t = d["totals"]
    # every client packet came twice: the second of each pair skipped before the engine
    # (which counts the first as captured), none taken for a retransmission of the client's
    assert t["mirror_duplicates"] == t["captured"] > 0
    assert t["duplicate"] == 0
    [source] = d["mirror_sources"]
    assert source["duplicates"] == t["mirror_duplicates"]
    assert source["packets"] == 2 * t["captured"]


@pytest.mark.parametrize("lab", [MIRROR], indirect=True)
def test_a_10mib_upload_at_1_percent_loss_is_byte_exact(lab):
    """Loss between the client and the online server, after the mirror (the mirror carries
    the lost packet and the client's retransmission), and of the copies at the target."""
    lab.ns.run(lab.ns.online, ["iptables", "-w", "5", "-t", "raw", "-I", "PREROUTING", "-s",
                               CLIENT_NET, "-p", "tcp", "-m", "statistic", "--mode",
                               "random", "--probability", "0.01", "-j", "DROP"])
    drop_copies(lab, 0.01)
    body = os.path.join(lab.dir, "body")
    with open(body, "wb") as f:
        f.write(os.urandom(10 * MiB))
    upload(lab, body, 2)
    assert_bodies_exact(lab, body, 2)
    t = daemon_status(lab)["totals"]
    assert t["duplicate"] > 0 and t["mirror_duplicates"] == 0   # the client's retransmits


@pytest.mark.parametrize("lab", [{**MIRROR, "tcpcopyd": False}], indirect=True)
def test_a_session_open_before_the_start_is_copied_from_the_mirror(lab):
    keepalive_across_the_start(lab, ONLINE_IP)
    wait_for(lambda: daemon_status(lab)["totals"]["sessions_fake"] == 1, 10, "the fake SYN counted")


@pytest.mark.parametrize("lab", [{**MIRROR, "tcpcopyd": False}], indirect=True)
def test_the_comparison_report_from_a_mirror_host(lab):
    """The online server's answers come through the mirror too (egress): the comparison
    test runs on the mirror host as on the online host."""
    from tests.lab.test_compare import records, report
    log = os.path.join(lab.dir, "compare.jsonl")
    lab.start_tcpcopyd(extra=["--compare", "--compare-log", log])

    def warm() -> bool:
        load.h2load(lab, requests=1, rate=1, path="/warm")
        return any(r["path"] == "/warm" and (r["target"] or {}).get("status")
                   for r in records(log))
    wait_for(warm, 30, "an exchange with the target's status")
    r = load.h2load(lab, requests=200, rate=100, path="/")
    assert r.succeeded == 200
    wait_for(lambda: sum(1 for r in records(log) if r["path"] == "/") >= 200, 60,
             "200 exchanges compared")
    got = [r for r in records(log) if r["path"] == "/"]
    assert len(got) == 200
    assert all(r["online"]["status"] == r["target"]["status"] == "200" and r["same_content"]
               for r in got)
    out = report(log, "--json")
    assert out.returncode == 0, out.stderr
    s = orjson.loads(out.stdout)
    assert s["online_only"] == s["target_only"] == s["status_mismatches"] == 0


@pytest.mark.parametrize("lab", [MIRROR], indirect=True)
def test_the_doctor_on_a_mirror_host(lab):
    from tests.lab.test_doctor import doctor, failed
    args = ["tcpcopyd", "--mirror", "-x", f"{ONLINE_IP}:80-{TARGET_IP}:80", "-s", TARGET_IP,
            "-i", MIRROR_DEVICE]
    quiet = doctor(lab, lab.ns.mirror, args)          # no client traffic now
    assert f"no client packet to {ONLINE_IP}:80 on {MIRROR_DEVICE}" in \
        failed(quiet)["mirrored traffic"], quiet.stdout
    assert "iptables -I INPUT -p udp --dport 4789 ! -s" in failed(quiet)["vxlan senders"]
    lab.ns.run(lab.ns.mirror, ["iptables", "-w", "5", "-I", "INPUT", "-p", "udp", "--dport",
                               "4789", "!", "-s", ONLINE_MIRROR_SIDE_IP, "-j", "DROP"])
    load_running = subprocess.Popen(
        # a connection every 50 ms for 8 s: traffic while the doctor listens
        ["ip", "netns", "exec", lab.ns.client, "h2load", "--h1", "-n", "160", "-c", "160",
         "-r", "1", "--rate-period", "50ms", "-T", "30", f"http://{ONLINE_IP}/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        busy = doctor(lab, lab.ns.mirror, args)
    finally:
        load_running.wait(timeout=120)
    assert busy.returncode == 0, busy.stdout + busy.stderr
    for name in ("mirrored traffic", "no forwarding", "vxlan senders", "target route",
                 "control port"):
        assert f"OK    {name}: " in busy.stdout, (name, busy.stdout)
    lab.ns.sysctl(lab.ns.mirror, {"net/ipv4/ip_forward": "1"})
    assert "no forwarding" in failed(doctor(lab, lab.ns.mirror, args))


@pytest.mark.parametrize("lab", [{**MIRROR, "second_online": True, "tcpcopyd": False}],
                         indirect=True)
def test_two_online_hosts_through_one_mirror_device(lab):
    """Two online hosts mirror into the one VXLAN device of the mirror host (a VNI each);
    one tcpcopyd copies both, each to its target address, and counts each source."""
    lab.start("tcpcopyd", lab.ns.mirror,
              [*command("tcpcopyd"), "--mirror", "-i", MIRROR_DEVICE, "-x",
               f"{ONLINE_IP}:80-{TARGET_IP}:80,{ONLINE2_IP}:80-{TARGET2_IP}:80",
               "-s", TARGET_IP, "--instance", f"{lab.ns.prefix}-tcpcopyd"])
    lab.wait_log("tcpcopyd", "connected to interceptd")
    lab.wait_workers_connected(f"{lab.ns.prefix}-tcpcopyd")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(load.h2load, lab, requests=1000, rate=500)
        second = pool.submit(load.h2load, lab, requests=1000, rate=500, ns=lab.ns.client2,
                             host=ONLINE2_IP)
        assert first.result().succeeded == second.result().succeeded == 1000
    target = target_caught_up(lab, 2000)
    assert collections.Counter(f[0] for f in target) == {CLIENT_IP: 1000, CLIENT2_IP: 1000}
    assert len({(f[0], f[1]) for f in target}) == 2000
    d = daemon_status(lab)
    sources = {m["source"]: m for m in d["mirror_sources"]}
    assert set(sources) == {ONLINE_IP, ONLINE2_IP}
    assert sum(m["packets"] for m in sources.values()) == d["totals"]["captured"]
    assert all(m["packets"] >= 3000 for m in sources.values())   # SYN, request, FIN each


@pytest.mark.parametrize("lab", [{**MIRROR, "ipv6": True}], indirect=True)
def test_both_families_from_a_mirror(lab):
    r = load.h2load(lab, requests=500, rate=250, host=f"[{ONLINE6_IP}]")
    assert r.succeeded == 500, r.output
    r = load.h2load(lab, requests=500, rate=250)
    assert r.succeeded == 500, r.output
    requests_once(lab, 1000)
    d = daemon_status(lab)
    sources = {m["source"]: m["packets"] for m in d["mirror_sources"]}
    assert set(sources) == {ONLINE_IP, ONLINE6_IP} and min(sources.values()) >= 1500
    assert d["totals"]["sessions_ipv6"] == 500


@pytest.mark.parametrize("lab", [{**MIRROR, "tcpcopyd": False}], indirect=True)
def test_a_capture_of_a_mirror_replayed_with_mirror_skips_its_duplicates(lab):
    """tcpdump on the mirror host's VXLAN device while every packet is mirrored twice; the
    file replayed with --mirror: each request once at the target."""
    from tests.lab.test_replay import replay, requests_in, syns_in
    lab.ns.mirror_again(twice=True)
    pcap = os.path.join(lab.dir, "mirror.pcap")
    lab.start("tcpdump", lab.ns.mirror, ["tcpdump", "-i", MIRROR_DEVICE, "-s", "0", "-U",
                                         "-n", "-w", pcap, "tcp", "port", "80"])
    lab.wait_log("tcpdump", f"listening on {MIRROR_DEVICE}")
    # tcpdump says it listens a moment before it captures: requests until one is in
    wait_for(lambda: lab.ns.run(lab.ns.client, ["curl", "-sS", "-o", "/dev/null",
                                                f"http://{ONLINE_IP}/warm"]) and syns_in(pcap),
             20, "tcpdump to write a first request")
    warm = syns_in(pcap)
    r = load.h2load(lab, requests=300, rate=150)
    assert r.succeeded == 300, r.output
    wait_for(lambda: syns_in(pcap) >= warm + 2 * 300, 20, "every SYN twice in the capture")
    # and every request: tcpdump writes what the kernel hands it in blocks, and a block can
    # close between a connection's SYN and its request
    wait_for(lambda: requests_in(pcap) >= 2 * 300, 20, "every request twice in the capture")
    lab.stop("tcpdump")
    _took, err = replay(lab, pcap, "--mirror", host=lab.ns.mirror,
                        rule=f"{ONLINE_IP}:80-{TARGET_IP}:80")
    assert "mirror_duplicates" in err, err
    target = target_caught_up(lab, 300)

    def requests(log):
        return sorted((f[0], f[1]) for f in log if f[6] == "/")
    assert requests(target) == requests(lab.nginx_log("online"))
