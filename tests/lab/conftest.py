"""Fixtures of the namespace lab: a fresh client/online/target trio per test, real nginx and
memcached, interceptd and tcpcopyd started by pid and checked for leaks at the end."""
from __future__ import annotations

import itertools
import os
import subprocess
import time

import orjson
import pytest

from shm import segment as shmseg
from tcpcopyd.lab.lab import Lab, LabError, wait_for

_ids = itertools.count()

pytestmark = pytest.mark.lab


@pytest.fixture
def lab(request):
    """A running lab with interceptd and tcpcopyd connected (``indirect`` parameters
    ``{"interceptd": False}`` / ``{"tcpcopyd": False}`` leave one out). Asserts at the end
    that no packet of the target reached the client or the online host, and that both
    daemons stop cleanly leaving no iptables (or ip6tables) rule or shm segment.
    ``workers``: that many workers on each side (the tests of the pools); by default the
    daemons' own (one). ``ipv6``: tcpcopyd copies the IPv6 clients too. ``mirror``:
    tcpcopyd runs on a mirror host, from the online host's mirrored traffic. ``image``:
    both daemons run from the image's root file system (systemd-nspawn)."""
    want = {"interceptd": True, "tcpcopyd": True, "memcached": True, "second_online": False,
            "assistant": False, "attacker": False, "nginx_extra": None, "route_back": True,
            "workers": None, "ipv6": False, "mirror": False, "image": False,
            **getattr(request, "param", {})}
    n = want["workers"]
    prefix = f"t{os.getpid() % 1000}x{next(_ids)}"
    lab = Lab(prefix, second_online=want["second_online"], assistant=want["assistant"],
              attacker=want["attacker"], nginx_extra=want["nginx_extra"],
              route_back=want["route_back"], mirror=want["mirror"])
    if want["image"]:     # the daemons from the image (tests/system: the image_root fixture)
        lab.image_root = request.getfixturevalue("image_root")
    try:
        lab.up(memcached=want["memcached"])
        if want["interceptd"]:
            lab.start_interceptd(extra=["--queues", str(n)] if n else [])
        if want["tcpcopyd"]:
            lab.start_tcpcopyd(wait_connected=want["interceptd"],
                               extra=["--workers", str(n)] if n else [], ipv6=want["ipv6"])
        yield lab
        leaked = lab.ns.leaked()
        rcs = {name: lab.stop(name) for name in ("tcpcopyd", "interceptd")}
        rules = "".join(lab.ns.run(lab.ns.target, [tables, "-w", "5", "-S", "OUTPUT"]).stdout
                        for tables in ("iptables", "ip6tables"))
        assert set(leaked.values()) == {0}, \
            f"target packets reached a client/online host: {leaked}"
        assert all(rc in (0, None) for rc in rcs.values()), \
            "\n".join([str(rcs), *(f"--- {n}:\n{lab.log_text(n)[-4000:]}"
                                    for n, rc in rcs.items() if rc)])
        assert "NFQUEUE" not in rules, rules
        assert not shmseg.list_segments(prefix), "shm segment left behind"
    finally:
        lab.down()
        lab.cleanup_files()


# the target's log is taken as whole once it has not grown for this long, seconds (so that
# a duplicate or a late copy beyond the expected count shows, and callers compare with ==)
SETTLED = 0.5


def target_caught_up(lab: Lab, expected: int, timeout: float = 60.0) -> list[list[str]]:
    """Wait until the target's nginx logged ``expected`` requests and then nothing more for
    SETTLED seconds; return its log (shorter if it timed out: the caller's assertion then
    names the count)."""
    try:
        wait_for(lambda: len(lab.nginx_log("target")) >= expected, timeout,
                 f"{expected} requests in the target's access log")
    except LabError:
        return lab.nginx_log("target")
    seen = [len(lab.nginx_log("target")), time.monotonic()]

    def settled() -> bool:
        n = len(lab.nginx_log("target"))
        if n != seen[0]:
            seen[:] = [n, time.monotonic()]
        return time.monotonic() - seen[1] >= SETTLED
    wait_for(settled, 10.0, "the target's access log to stop growing")
    return lab.nginx_log("target")


def daemon_status(lab: Lab, name: str = "tcpcopyd") -> dict:
    """What `tcpcopyctl status --json` says of one of the lab's daemons."""
    [status] = orjson.loads(ctl_status(f"{lab.ns.prefix}-{name}").stdout)
    return status


def ctl_status(name: str) -> subprocess.CompletedProcess:
    from tcpcopyd.lab.lab import bin_path
    return subprocess.run([bin_path("tcpcopyctl"), "status", "--json", name],
                          capture_output=True, text=True)
