"""HTTP through real nginx on both sides, load from h2load/curl in the client namespace."""
from __future__ import annotations

import collections

import pytest

from tcpcopyd.lab import load
from tcpcopyd.lab.net import ONLINE_IP
from tests.lab.conftest import target_caught_up

pytestmark = pytest.mark.lab


def requests_by_port(log):
    """(client port, status, request length, uri) of every logged request."""
    return collections.Counter((f[1], f[2], f[3], f[6]) for f in log)


def test_short_connections_at_1000_per_second_lose_nothing(lab):
    r = load.h2load(lab, requests=20000, rate=1000)
    assert r.succeeded == 20000, r.output
    online = lab.nginx_log("online")
    assert len(online) == 20000
    target = target_caught_up(lab, 20000)
    assert len(target) == 20000
    assert all(f[2] == "200" for f in target)
    assert requests_by_port(target) == requests_by_port(online)


def test_keepalive_ten_requests_per_connection(lab):
    r = load.h2load(lab, requests=10000, rate=1000, per_connection=10)
    assert r.succeeded == 10000, r.output
    target = target_caught_up(lab, 10000)
    assert len(target) == 10000
    assert all(f[2] == "200" for f in target)
    assert requests_by_port(target) == requests_by_port(lab.nginx_log("online"))


@pytest.mark.parametrize("size", [64 * 1024, 1024 * 1024])
def test_post_bodies_arrive_with_the_same_length(lab, size):
    body = lab.dir + f"/body{size}"
    with open(body, "wb") as f:
        f.write(bytes((i * 31 + 7) & 0xFF for i in range(size)))
    r = lab.ns.run(lab.ns.client, ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                   "--data-binary", f"@{body}", "-H",
                                   "Content-Type: application/octet-stream",
                                   f"http://{ONLINE_IP}/upload"])
    assert r.stdout == "200"
    [online] = lab.nginx_log("online")
    [target] = target_caught_up(lab, 1)
    assert online[3] == target[3] and int(target[3]) > size   # $request_length, with body
    assert target[2] == "200"
