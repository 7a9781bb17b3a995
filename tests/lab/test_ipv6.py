"""IPv6 end to end in the dual-stack lab (fd18::/16 inside the lab's namespaces): real
clients over IPv6, and over both families at once through one daemon pair; the fixture
checks at the end that no packet of the target reached the client or the online host
(ip6tables counters beside the iptables ones) and that no rule of either is left."""
from __future__ import annotations

import collections
import subprocess

import pytest

from tcpcopyd.lab import load
from tcpcopyd.lab.lab import MEMCACHED_PORT, wait_for
from tcpcopyd.lab.net import CLIENT6_IP, CLIENT_IP, ONLINE6_IP, ONLINE_IP, TARGET6_IP
from tests.lab.conftest import daemon_status, target_caught_up
from tests.lab.test_sessions import keepalive_across_the_start

pytestmark = pytest.mark.lab

IPV6 = {"ipv6": True}
ONLINE6 = f"[{ONLINE6_IP}]"


def requests_by_port(log, address: str | None = None):
    """(client address, client port, status, request length, uri) of every logged request
    (of ``address`` only, if given)."""
    return collections.Counter((f[0], f[1], f[2], f[3], f[6]) for f in log
                               if address is None or f[0] == address)


def totals(lab, name: str) -> dict:
    return daemon_status(lab, name)["totals"]


@pytest.mark.parametrize("lab", [IPV6], indirect=True)
def test_short_connections_over_ipv6_lose_nothing(lab):
    r = load.h2load(lab, requests=3000, rate=500, host=ONLINE6)
    assert r.succeeded == 3000, r.output
    online = lab.nginx_log("online")
    assert {f[0] for f in online} == {CLIENT6_IP}
    target = target_caught_up(lab, 3000)
    assert requests_by_port(target) == requests_by_port(online)
    assert all(f[2] == "200" for f in target)
    t = totals(lab, "tcpcopyd")
    assert t["not_followed"] == 0 and t["sessions_ipv6"] == t["sessions_opened"] == 3000
    assert totals(lab, "interceptd")["queued_ipv6"] == totals(lab, "interceptd")["queued"]


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
    # the families in the counters: 2 000 short IPv4 sessions, 50 keep-alive IPv6 ones
    t = totals(lab, "tcpcopyd")
    assert t["sessions_opened"] == 2050 and t["sessions_ipv6"] == 50


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


@pytest.mark.parametrize("lab", [{**IPV6, "tcpcopyd": False}], indirect=True)
def test_an_ipv6_session_open_before_tcpcopyd_started_gets_a_fake_syn(lab):
    target = keepalive_across_the_start(lab, ONLINE6_IP, ipv6=True)
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


@pytest.mark.parametrize("lab", [{**IPV6, "tcpcopyd": False, "memcached": False}],
                         indirect=True)
def test_offline_replay_of_a_capture_of_both_families(lab):
    import os

    from tcpcopyd.lab.lab import bin_path
    from tcpcopyd.lab.net import TARGET_IP
    pcap = os.path.join(lab.dir, "online.pcap")
    lab.start("tcpdump", lab.ns.online, ["tcpdump", "-i", "eth0", "-s", "0", "-U", "-n",
                                         "-w", pcap, "tcp", "port", "80"])
    lab.wait_log("tcpdump", "listening on eth0")
    lab.ns.run(lab.ns.client, ["curl", "-sS", "-o", "/dev/null", f"http://{ONLINE6}/"])
    wait_for(lambda: os.path.getsize(pcap) > 500, 20, "tcpdump to write the first request")
    for host in (ONLINE6, ONLINE_IP):
        r = load.h2load(lab, requests=200, rate=200, per_connection=2, host=host)
        assert r.succeeded == 200, r.output

    def whole() -> bool:
        return sum(1 for _ts, pkt in _packets(pcap) if _is_syn(pkt)) == 1 + 100 + 100
    wait_for(whole, 30, "every SYN in the capture")
    assert lab.stop("tcpdump") == 0
    online = lab.nginx_log("online")
    r = lab.ns.run(lab.ns.online, [bin_path("tcpcopyd"), "-x",
                                   f"80-{TARGET_IP}:80,80-[{TARGET6_IP}]:80", "-s", TARGET_IP,
                                   "-i", pcap], check=False, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "201 sessions (201 seen from their SYN)" in r.stderr, r.stderr
    target = target_caught_up(lab, len(online))
    for address in (CLIENT_IP, CLIENT6_IP):
        assert requests_by_port(target, address) == requests_by_port(online, address)


def _packets(pcap: str):
    from tcpcopyd.net import pcapfile
    try:
        yield from pcapfile.packets(pcap, collections.Counter())
    except Exception:   # noqa: BLE001 - the last record may be half written
        return


def _is_syn(pkt: bytes) -> bool:
    from tcpcopyd.net import packet as P
    try:
        p = P.parse(pkt)
    except P.MalformedPacket:
        return False
    return p.flags & (P.SYN | P.ACK) == P.SYN


@pytest.mark.parametrize("lab", [{**IPV6, "tcpcopyd": False, "memcached": False,
                                  "nginx_extra": {
                                      "online": 'location = /fail { return 200 "fine"; }\n',
                                      "target": 'location = /fail { return 500; }\n'}}],
                         indirect=True)
def test_the_comparison_report_over_ipv6(lab):
    import json
    import os
    log = os.path.join(lab.dir, "compare.jsonl")
    lab.start_tcpcopyd(ipv6=True, extra=["--compare", "--compare-log", log,
                                         "--compare-ignore", "Date"])

    def records() -> list[dict]:
        try:
            with open(log) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def warm() -> bool:
        load.h2load(lab, requests=1, rate=1, path="/warm", host=ONLINE6)
        return any(r["path"] == "/warm" and (r["target"] or {}).get("status")
                   for r in records())
    wait_for(warm, 30, "an exchange with the target's status")
    for path in ("/fail", "/"):
        assert load.h2load(lab, requests=30, rate=100, path=path, host=ONLINE6).succeeded == 30
    wait_for(lambda: sum(1 for r in records() if r["path"] in ("/fail", "/")) >= 60, 60,
             "60 exchanges compared")
    recs = [r for r in records() if r["path"] in ("/fail", "/")]
    assert all(r["client"].startswith(f"[{CLIENT6_IP}]:") for r in recs)
    assert all(r["target"]["status"] == "500" for r in recs if r["path"] == "/fail")
    assert all(r["same_status"] and r["same_content"] for r in recs if r["path"] == "/")


@pytest.mark.parametrize("lab", [{**IPV6, "memcached": False}], indirect=True)
def test_10mib_uploads_over_ipv6_are_byte_exact_at_1_percent_loss(lab):
    import os

    from tcpcopyd.lab.net import CLIENT6_NET
    from tcpcopyd.lab.transfers import sha256
    body = os.path.join(lab.dir, "body")
    with open(body, "wb") as f:
        f.write(os.urandom(10 << 20))
    # 1 % of the copies arriving at the target dropped (the online side untouched)
    lab.ns.run(lab.ns.target, ["ip6tables", "-w", "5", "-t", "raw", "-I", "PREROUTING",
                               "-s", CLIENT6_NET, "-p", "tcp", "-m", "statistic", "--mode",
                               "random", "--probability", "0.01", "-j", "DROP"])
    for i in range(3):
        r = lab.ns.run(lab.ns.client, ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                       "--data-binary", f"@{body}", "-H", "Expect:",
                                       f"http://{ONLINE6}/upload?{i}"], timeout=300)
        assert r.stdout == "200", r
    target = target_caught_up(lab, 3, timeout=240)
    want = sha256(body)
    assert len(target) == 3
    t = totals(lab, "tcpcopyd")
    assert all(f[0] == CLIENT6_IP and f[2] == "200" and f[7] != "-" and sha256(f[7]) == want
               for f in target), (target, {k: v for k, v in t.items() if v})
    assert t["retransmits"] + t["fast_retransmits"] > 0


@pytest.mark.parametrize("lab", [{**IPV6, "tcpcopyd": False, "memcached": False}],
                         indirect=True)
def test_copies_from_an_ipv6_pool(lab):
    from pyroute2 import NetNS

    from tcpcopyd.lab.net import ONLINE6_TARGET_SIDE_IP, ONLINE_TARGET_SIDE_IP
    # the target routes the pools back through the online host, as it does the clients
    with NetNS(lab.ns.target) as n:
        n.route("add", dst="fd18:6::/64", gateway=ONLINE6_TARGET_SIDE_IP)
        n.route("add", dst="198.18.6.0/24", gateway=ONLINE_TARGET_SIDE_IP)
    lab.start_tcpcopyd([80], ipv6=True, extra=["-c", "fd18:6::/120,198.18.6.x"])
    for host in (ONLINE6, ONLINE_IP):
        assert load.h2load(lab, requests=300, rate=300, host=host).succeeded == 300
    target = target_caught_up(lab, 600)
    six = [f for f in target if ":" in f[0]]
    four = [f for f in target if ":" not in f[0]]
    # a copy takes a pool address of its client's family
    assert len(six) == len(four) == 300
    assert all(f[0].startswith("fd18:6::") for f in six)
    assert all(f[0].startswith("198.18.6.") for f in four)
    assert all(f[2] == "200" for f in target)


@pytest.mark.parametrize("lab", [{**IPV6, "assistant": True, "memcached": False}],
                         indirect=True)
def test_an_assistant_takes_the_ipv6_replies(lab):
    r = load.h2load(lab, requests=2000, rate=500, host=ONLINE6)
    assert r.succeeded == 2000, r.output
    target = target_caught_up(lab, 2000)
    assert requests_by_port(target) == requests_by_port(lab.nginx_log("online"))
    assert all(f[0] == CLIENT6_IP and f[2] == "200" for f in target)
    t = totals(lab, "interceptd")
    assert t["queued_ipv6"] == t["queued"] > 0
