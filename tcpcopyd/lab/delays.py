"""How long a copy takes: a client's SYN (and its connection's first data segment) seen on
the online host's interface, then its copy seen on the target's interface — both captured
by tcpdump on one machine, so with one clock. The copy keeps the client's address, port and
sequence numbers, which match the two."""
from __future__ import annotations

import collections
import statistics
import subprocess

from tcpcopyd.net import packet as P
from tcpcopyd.net.pcapfile import packets

# client segments to the service port: SYNs (without ACK) and segments that push data
FILTER = ("tcp dst port {port} and ((tcp[tcpflags] & (tcp-syn|tcp-ack)) == tcp-syn "
          "or (tcp[tcpflags] & tcp-push) != 0)")


def start_capture(lab, ns: str, path: str, port: int = 80) -> subprocess.Popen:
    """tcpdump on ``ns``'s eth0 into ``path`` (stop it with ``stop_capture``)."""
    return subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-i", "eth0", "-n", "-s",
                             "96", "--time-stamp-precision", "nano", "-U", "-w", path,
                             FILTER.format(port=port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_capture(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _firsts(path: str) -> tuple[dict, dict]:
    """When each SYN and each connection's first data segment was first seen, keyed by
    (client address, client port, sequence number)."""
    syns: dict[tuple, float] = {}
    data: dict[tuple, float] = {}
    with_data: set[tuple] = set()
    for t, ip in packets(path, collections.Counter(), headers_only=True):
        if len(ip) < 40 or ip[0] != 0x45:
            continue        # the capture keeps 96 bytes: the headers are all we read
        (_v, _tos, _len, _id, _frag, _ttl, _proto, _c, src, _dst, sport, _dport, seq, _ack,
         offflags, _win, _sum, _urg) = P.IP_TCP.unpack_from(ip, 0)
        key = (src, sport, seq)
        if offflags & P.SYN:
            syns.setdefault(key, t)
        elif (src, sport) not in with_data:
            with_data.add((src, sport))
            data.setdefault(key, t)
    return syns, data


def copy_delays(online_pcap: str, target_pcap: str) -> dict[str, list[float]]:
    """{"syn": [...], "data": [...]}: seconds from the online interface to the target's."""
    out = {}
    online, target = _firsts(online_pcap), _firsts(target_pcap)
    for name, a, b in (("syn", online[0], target[0]), ("data", online[1], target[1])):
        out[name] = [b[k] - t for k, t in a.items() if k in b and b[k] >= t]
    return out


def percentiles(values: list[float], points: tuple[int, ...] = (50, 90, 99)) -> dict:
    """{p: value} in milliseconds; empty when there are too few values."""
    if len(values) < 2:
        return {}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {p: 1000 * q[p - 1] for p in points}
