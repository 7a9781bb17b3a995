"""Offline replay: a capture recorded in the lab (tcpdump on the online host) replayed with
`tcpcopyd -i FILE` at its own pace, 5x faster, and twice with the gaps cut: the target logs
the same requests."""
from __future__ import annotations

import collections
import os
import re

import pytest

from tcpcopyd.lab import load
from tcpcopyd.lab.lab import bin_path, wait_for
from tcpcopyd.lab.net import ONLINE_IP, TARGET_IP
from tcpcopyd.net import pcapfile
from tests.lab.conftest import target_caught_up

pytestmark = pytest.mark.lab

REQUESTS = 1000


def per_port(log) -> collections.Counter:
    """(client port, request length, uri) -> times logged"""
    return collections.Counter((f[1], f[3], f[6]) for f in log)


def syns_in(pcap: str) -> int:
    """client SYNs in the capture file so far (a record being written is not counted)"""
    return _count(pcap, lambda pkt, ihl: pkt[ihl + 13] & 0x12 == 0x02)


def requests_in(pcap: str, start: bytes = b"GET / ") -> int:
    """IPv4 client segments in the capture file so far whose payload begins with
    ``start``: a request's first segment"""
    return _count(pcap, lambda pkt, ihl: pkt[ihl + (pkt[ihl + 12] >> 4) * 4:].startswith(start))


def _count(pcap: str, match) -> int:
    n = 0
    try:
        for _ts, pkt in pcapfile.packets(pcap, collections.Counter()):
            ihl = (pkt[0] & 0xF) * 4
            if pkt[9] == 6 and match(pkt, ihl):
                n += 1
    except Exception:   # noqa: BLE001 - the last record may be half written
        pass
    return n


def replay(lab, pcap: str, *flags: str, host: str | None = None,
           rule: str = f"80-{TARGET_IP}:80") -> tuple[float, str]:
    r = lab.ns.run(host or lab.ns.online, [bin_path("tcpcopyd"), "-x", rule, "-s", TARGET_IP,
                                           "-i", pcap, *flags], check=False, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    took = float(re.search(r"replay done in ([\d.]+)s", r.stderr).group(1))
    return took, r.stderr


@pytest.mark.parametrize("lab", [{"tcpcopyd": False, "memcached": False}], indirect=True)
def test_replay_of_a_lab_capture_at_1x_and_5x(lab):
    pcap = os.path.join(lab.dir, "online.pcap")
    lab.start("tcpdump", lab.ns.online, ["tcpdump", "-i", "eth0", "-s", "0", "-U", "-n",
                                         "-w", pcap, "tcp", "port", "80"])
    lab.wait_log("tcpdump", "listening on eth0")
    # tcpdump says it listens a moment before it captures: one request first, until the
    # file holds it
    r = lab.ns.run(lab.ns.client, ["curl", "-sS", "-o", "/dev/null", f"http://{ONLINE_IP}/"])
    wait_for(lambda: os.path.getsize(pcap) > 1000, 20, "tcpdump to write the first request")
    r = load.h2load(lab, requests=REQUESTS, rate=250, per_connection=2)
    assert r.succeeded == REQUESTS, r.output
    # tcpdump writes what the kernel hands it in blocks: wait for the last connections
    wait_for(lambda: syns_in(pcap) == REQUESTS // 2 + 1, 30, "every SYN in the capture")
    assert lab.stop("tcpdump") == 0
    online = lab.nginx_log("online")
    assert len(online) == REQUESTS + 1
    assert lab.nginx_log("target") == []     # nothing was copied live

    took_1x, out = replay(lab, pcap)
    sessions = REQUESTS // 2 + 1
    assert f"{sessions} sessions ({sessions} seen from their SYN)" in out, out
    target = target_caught_up(lab, REQUESTS + 1)
    assert per_port(target) == per_port(online)
    assert all(f[2] == "200" for f in target)

    took_5x, _ = replay(lab, pcap, "-a", "5")
    target = target_caught_up(lab, 2 * (REQUESTS + 1))
    assert per_port(target[REQUESTS + 1:]) == per_port(online)
    # the capture spans about 4 s: 1x keeps its pace, 5x is faster (sessions then take
    # a moment more to end on the target)
    assert took_1x >= 3.5, took_1x
    assert took_5x < took_1x - 1.5, (took_5x, took_1x)

    # twice over, every gap cut to nothing: the same requests twice, sooner than at 1x
    took_t2, out = replay(lab, pcap, "-T", "2", "-I", "0")
    assert "(2/2)" in out
    target = target_caught_up(lab, 4 * (REQUESTS + 1))
    twice = collections.Counter({k: 2 * v for k, v in per_port(online).items()})
    assert per_port(target[2 * (REQUESTS + 1):]) == twice
    assert took_t2 < took_1x, (took_t2, took_1x)
