"""Start-up failures that need root: each prints one line with the fix, exits non-zero and
leaves nothing behind (no iptables rule, no shm segment, no process)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from shm import segment as shmseg
from tcpcopyd.lab.lab import bin_path
from tcpcopyd.lab.net import Namespaces

pytestmark = pytest.mark.lab


@pytest.fixture
def ns():
    n = Namespaces(f"e{os.getpid() % 1000}")
    n.create()
    yield n
    n.destroy()


IP = shutil.which("ip") or "/usr/sbin/ip"


def run_in(ns_name, args, env=None):
    return subprocess.run([IP, "netns", "exec", ns_name, *args], capture_output=True,
                          text=True, timeout=60, env=env)


def nothing_left(ns: Namespaces, instance: str) -> None:
    assert "NFQUEUE" not in run_in(ns.target, ["iptables", "-S", "OUTPUT"]).stdout
    assert not shmseg.list_segments(instance)


def test_missing_interface(ns):
    r = run_in(ns.online, [bin_path("tcpcopyd"), "-x", "80-198.18.2.2:80", "-s", "198.18.2.2",
                           "-i", "nosuch0", "--instance", f"{ns.prefix}-t"])
    assert r.returncode == 78
    assert r.stderr.strip().startswith("tcpcopyd: interface 'nosuch0' does not exist")
    nothing_left(ns, f"{ns.prefix}-t")


def test_not_root():
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) not installed")
    for prog, args in (("tcpcopyd", ["-x", "80-198.18.2.2:80", "-s", "198.18.2.2", "-i", "lo"]),
                       ("interceptd", ["--service-port", "80"])):
        r = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                            bin_path(prog), *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip().startswith(f"{prog}: needs CAP_NET_"), r.stderr


def test_interceptd_without_iptables(ns):
    env = {**os.environ, "PATH": "/nonexistent"}
    r = run_in(ns.target, [bin_path("interceptd"), "--service-port", "80", "--instance",
                           f"{ns.prefix}-i"], env=env)
    assert r.returncode == 1
    assert r.stderr.strip() == ("interceptd: iptables not found: apt install iptables (or run "
                                "with --no-iptables and install the NFQUEUE rules yourself)")
    nothing_left(ns, f"{ns.prefix}-i")


def test_interceptd_whose_queue_is_taken_stops_cleanly(ns):
    first = subprocess.Popen(["ip", "netns", "exec", ns.target, bin_path("interceptd"),
                              "--service-port", "80", "--instance", f"{ns.prefix}-a"],
                             stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stderr:
            if "reading NFQUEUE" in line:
                break
        r = run_in(ns.target, [bin_path("interceptd"), "--service-port", "81", "-p", "36525",
                               "--instance", f"{ns.prefix}-b"])
        assert r.returncode == 1
        assert "cannot bind NFQUEUE 0" in r.stderr
        assert not shmseg.list_segments(f"{ns.prefix}-b")
        rules = run_in(ns.target, ["iptables", "-S", "OUTPUT"]).stdout
        assert f"interceptd:{ns.prefix}-b" not in rules
    finally:
        first.terminate()
        first.wait(10)
    nothing_left(ns, f"{ns.prefix}-a")
