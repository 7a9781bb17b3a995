"""Mixed pairs with the C programs, where they are at hand (they are never part of this
repository; build them outside it, see DEVELOPERS.md): the C tcpcopy 1.3 with our
interceptd, admitted by its allow list; our tcpcopyd, offering its extensions, with the C
intercept 1.0, which ignores the offer. Set TCPCOPYD_C_TCPCOPY / TCPCOPYD_C_INTERCEPT to
the binaries."""
from __future__ import annotations

import json
import os
import signal

import pytest

from tcpcopyd.lab import load
from tcpcopyd.lab.lab import wait_for
from tcpcopyd.lab.net import TARGET_IP
from tests.lab.conftest import target_caught_up

pytestmark = pytest.mark.lab

C_TCPCOPY = os.environ.get("TCPCOPYD_C_TCPCOPY", "")
C_INTERCEPT = os.environ.get("TCPCOPYD_C_INTERCEPT", "")
# iptables comment of the rule this test installs for the C intercept
C_RULE_TAG = "tcpcopyd-lab-c-intercept"


@pytest.mark.skipif(not os.access(C_TCPCOPY, os.X_OK),
                    reason="set TCPCOPYD_C_TCPCOPY to a C tcpcopy 1.3 binary")
@pytest.mark.parametrize("lab", [{"memcached": False, "tcpcopyd": False}], indirect=True)
def test_the_c_tcpcopy_with_our_interceptd_when_its_allow_list_admits_it(lab):
    lab.start("tcpcopyd", lab.ns.online,
              [C_TCPCOPY, "-x", f"80-{TARGET_IP}:80", "-s", TARGET_IP])
    lab.wait_log("interceptd", "connected to worker", count=2, timeout=30)
    r = load.h2load(lab, requests=2000, rate=500)
    assert r.succeeded == 2000
    assert len(target_caught_up(lab, 2000)) == 2000
    lab.stop("tcpcopyd", signal.SIGINT)


@pytest.mark.skipif(not os.access(C_INTERCEPT, os.X_OK),
                    reason="set TCPCOPYD_C_INTERCEPT to a C intercept 1.0 binary")
@pytest.mark.parametrize("lab", [{"memcached": False, "interceptd": False,
                                  "tcpcopyd": False}], indirect=True)
@pytest.mark.parametrize("mode", ["plain", "secret", "compare"],
                         ids=["no secret", "with a secret: not used", "comparing"])
def test_our_tcpcopyd_offering_extensions_with_the_c_intercept(lab, mode):
    rule = ["OUTPUT", "-p", "tcp", "--sport", "80", "-m", "comment", "--comment", C_RULE_TAG,
            "-j", "NFQUEUE", "--queue-num", "0"]
    lab.ns.run(lab.ns.target, ["iptables", "-w", "5", "-I", *rule])
    try:
        lab.start("interceptd", lab.ns.target, [C_INTERCEPT, "-l", "/dev/stdout"])
        extra = []
        secret = mode == "secret"
        compare_log = os.path.join(lab.dir, "compare.jsonl")
        if mode == "compare":   # the C intercept sends no answer's first bytes
            extra = ["--compare", "--compare-log", compare_log]
        if secret:      # a C intercept cannot prove it: not used, nothing copied
            path = os.path.join(lab.dir, "secret")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, b"a secret the C intercept does not know")
            os.close(fd)
            extra = ["--secret-file", path]
        lab.start_tcpcopyd(ports=[80], extra=extra, wait_connected=not secret)
        if secret:
            lab.wait_log("tcpcopyd", "(a C intercept?), so it cannot prove the shared secret")
            r = load.h2load(lab, requests=500, rate=250)
            assert r.succeeded == 500
            assert lab.nginx_log("target") == []
            lab.stop("tcpcopyd")
            lab.stop("interceptd", signal.SIGINT)
            return
        r = load.h2load(lab, requests=2000, rate=500)
        assert r.succeeded == 2000
        assert len(target_caught_up(lab, 2000)) == 2000
        # the offer: one "unknown msg type" per connection, nothing else
        wait_for(lambda: "unknown msg type" in lab.log_text("interceptd"), 10,
                 "the C intercept to log our offer")
        lab.stop("tcpcopyd")
        lab.stop("interceptd", signal.SIGINT)
        if mode == "compare":   # sizes and times of both sides; no target status
            with open(compare_log) as f:
                recs = [json.loads(line) for line in f]
            assert len(recs) >= 1900
            assert all(r["online"]["status"] == "200" for r in recs if r["online"])
            assert all(r["target"]["status"] == "" and r["same_status"] is None
                       and r["target"]["size"] > 0 for r in recs if r["target"])
    finally:
        lab.ns.run(lab.ns.target, ["iptables", "-w", "5", "-D", *rule], check=False)
