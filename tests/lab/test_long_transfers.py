"""Long transfers under loss (issue #4): copied packets toward the target are dropped at
random on the target (iptables statistic, online side untouched); uploads must reach the
target's nginx byte-exact, downloads must complete there."""
from __future__ import annotations

import os

import pytest

from tcpcopyd.lab.lab import wait_for
from tcpcopyd.lab.net import CLIENT_NET, ONLINE_IP
from tcpcopyd.lab.servers import BIG_FILE_SIZE
from tcpcopyd.lab.transfers import sha256
from tests.lab.conftest import ctl_status, target_caught_up

pytestmark = pytest.mark.lab

MiB = 1024 * 1024


def drop_copies(lab, probability: float) -> None:
    """Drop that share of the copies arriving at the target (from client addresses)."""
    if probability:
        lab.ns.run(lab.ns.target, ["iptables", "-w", "5", "-t", "raw", "-I", "PREROUTING",
                                   "-s", CLIENT_NET, "-p", "tcp", "-m", "statistic", "--mode",
                                   "random", "--probability", str(probability), "-j", "DROP"])


def upload(lab, path: str, n: int) -> None:
    for i in range(n):
        r = lab.ns.run(lab.ns.client, ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                       "--data-binary", f"@{path}", "-H", "Expect:",
                                       f"http://{ONLINE_IP}/upload?{i}"], timeout=300)
        assert r.stdout == "200", r


def assert_bodies_exact(lab, body: str, n: int) -> None:
    want = sha256(body)
    target = target_caught_up(lab, n, timeout=240)
    assert len(target) == n
    for f in target:
        assert f[2] == "200", f
        assert f[7] != "-" and sha256(f[7]) == want, f"body of {f[6]} differs"


def counters(lab) -> dict:
    import orjson
    [d] = orjson.loads(ctl_status(f"{lab.ns.prefix}-tcpcopyd").stdout)
    return d["totals"]


@pytest.mark.parametrize("lab", [{"memcached": False}], indirect=True)
@pytest.mark.parametrize("drop", [0.0, 0.001, 0.01])
def test_ten_10mib_uploads_are_byte_exact_under_loss(lab, drop):
    body = os.path.join(lab.dir, "body")
    with open(body, "wb") as f:
        f.write(os.urandom(10 * MiB))
    drop_copies(lab, drop)
    upload(lab, body, 10)
    assert_bodies_exact(lab, body, 10)
    if drop:
        assert counters(lab)["retransmits"] + counters(lab)["fast_retransmits"] > 0


@pytest.mark.parametrize("lab", [{"memcached": False, "tcpcopyd": False}], indirect=True)
def test_a_100mib_upload_is_byte_exact_at_0_1_percent_loss(lab):
    lab.start_tcpcopyd([80], extra=["--session-buffer", str(256 * MiB)])
    body = os.path.join(lab.dir, "body")
    with open(body, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(MiB))
    drop_copies(lab, 0.001)
    upload(lab, body, 1)
    assert_bodies_exact(lab, body, 1)


@pytest.mark.parametrize("lab", [{"memcached": False}], indirect=True)
def test_a_50mib_download_completes_on_the_target_at_1_percent_loss(lab):
    drop_copies(lab, 0.01)
    r = lab.ns.run(lab.ns.client, ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                   f"http://{ONLINE_IP}/big.bin"], timeout=120)
    assert r.stdout == "200"
    [f] = target_caught_up(lab, 1, timeout=120)
    assert f[2] == "200" and int(f[4]) > BIG_FILE_SIZE  # $bytes_sent: headers + the file


@pytest.mark.parametrize("lab", [{"memcached": False, "tcpcopyd": False}], indirect=True)
def test_uploads_with_gro_on_the_capture_interface(lab):
    lab.ns.run(lab.ns.online, ["ethtool", "-K", "eth0", "gro", "on"])
    lab.ns.run(lab.ns.client, ["ethtool", "-K", "eth0", "tso", "on", "gso", "on"])
    lab.start_tcpcopyd([80])
    body = os.path.join(lab.dir, "body")
    with open(body, "wb") as f:
        f.write(os.urandom(10 * MiB))
    drop_copies(lab, 0.001)
    upload(lab, body, 3)
    assert_bodies_exact(lab, body, 3)
    wait_for(lambda: counters(lab)["oversize_frames"] > 0, 5,
             "frames above the MTU in the capture (GRO)")
