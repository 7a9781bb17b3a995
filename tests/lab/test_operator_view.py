"""The operator's view in the lab: `tcpcopyctl status` tells healthy from down and back
(interceptd stopped and started again), members of the group tcpcopyd read it without root,
and the metrics pass `promtool check metrics` and are scraped by a real Prometheus."""
from __future__ import annotations

import contextlib
import grp
import io
import json
import os
import shutil
import subprocess
import time
import urllib.parse

import pytest

from shm import rundir
from tcpcopyd.ctl import cli as ctl
from tcpcopyd.lab import load
from tcpcopyd.lab.lab import command, wait_for
from tests.lab.conftest import ctl_status, target_caught_up

pytestmark = pytest.mark.lab

NOBODY = 65534
METRICS_PORT = 9821
PROMETHEUS_PORT = 19090


def status(lab) -> tuple[int, dict]:
    r = ctl_status(f"{lab.ns.prefix}-tcpcopyd")
    return r.returncode, (json.loads(r.stdout)[0] if r.stdout.strip() else {})


def state_is(lab, state: str, code: int) -> bool:
    rc, d = status(lab)
    return rc == code and d.get("state") == state


@pytest.mark.parametrize("lab", [{"memcached": False}], indirect=True)
def test_status_says_down_while_no_interceptd_is_reachable_and_healthy_again(lab):
    rc, d = status(lab)
    assert (rc, d["state"]) == (0, "healthy"), d["problems"]
    [peer] = d["links"]
    assert (peer["address"], peer["state"], peer["up"]) == ("198.18.2.2", "up",
                                                              peer["links"])
    lab.stop("interceptd")
    wait_for(lambda: state_is(lab, "down", 3), 20, "status to say down (exit 3)")
    rc, d = status(lab)
    assert d["links"][0]["state"] == "down" and d["links"][0]["up"] == 0
    assert d["problems"][0].startswith("no interceptd reachable: 198.18.2.2:36524 down (")
    text = subprocess.run([*command("tcpcopyctl"), "status", f"{lab.ns.prefix}-tcpcopyd"],
                          capture_output=True, text=True)
    assert text.returncode == 3
    assert "DOWN: no interceptd reachable" in text.stdout
    assert "interceptd 198.18.2.2:36524  down (0/" in text.stdout
    lab.start_interceptd([80])
    wait_for(lambda: state_is(lab, "healthy", 0), 30, "status to say healthy again")
    rc, d = status(lab)
    assert d["links"][0]["reconnects"] >= 1
    r = load.h2load(lab, requests=200, rate=200)
    assert r.succeeded == 200
    assert len(target_caught_up(lab, 200)) == 200


def run_as(uid: int, gid: int, groups: list[int], argv: list[str]) -> tuple[int, str, str]:
    """tcpcopyctl's main in a child process with these credentials (the test's virtualenv
    may sit where another user cannot run it: the code is already loaded here)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 99
        out, err = io.StringIO(), io.StringIO()
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = ctl.main(argv)
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            err.write(f"{type(e).__name__}: {e}")
        finally:
            os.write(w, json.dumps([code, out.getvalue(), err.getvalue()]).encode())
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    code, out, err = json.loads(data)
    return code, out, err


@pytest.mark.parametrize("lab", [{"memcached": False}], indirect=True)
def test_members_of_the_group_read_status_without_root(lab):
    try:
        gid = grp.getgrnam(rundir.READERS_GROUP).gr_gid
    except KeyError:
        pytest.fail(f"no group {rundir.READERS_GROUP!r}: tools/setup.sh makes it (the "
                    "Debian package does on real hosts)")
    name = f"{lab.ns.prefix}-tcpcopyd"
    seg = os.stat(os.path.join(rundir.RUNTIME_DIR, f"{name}.shm"))
    assert (seg.st_gid, oct(seg.st_mode & 0o777)) == (gid, "0o640")
    code, out, err = run_as(NOBODY, NOBODY, [gid], ["status", "--json", "--interval", "0.2",
                                                    name])
    assert code == 0, err
    [d] = json.loads(out)
    assert d["state"] == "healthy" and len(d["workers"]) >= 1
    assert d["links"][0]["state"] == "up"
    # not a member: told why, not "nothing is running"
    code, out, err = run_as(NOBODY, NOBODY, [], ["status", "--interval", "0.2"])
    assert code == 4, (out, err)
    assert f"permission denied (run as root, or as a member of the group " \
           f"{rundir.READERS_GROUP})" in err
    assert "no tcpcopyd or interceptd is running" not in err


def promtool_check(text: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("lab", [{"memcached": False, "tcpcopyd": False}], indirect=True)
def test_metrics_pass_promtool_and_a_real_prometheus_scrapes_them(lab):
    for tool in ("promtool", "prometheus"):
        assert shutil.which(tool), f"{tool} is missing: tools/setup.sh installs Debian's " \
                                   "prometheus package"
    lab.start_tcpcopyd([80], extra=["--metrics-listen", f"127.0.0.1:{METRICS_PORT}"])
    r = load.h2load(lab, requests=300, rate=300)
    assert r.succeeded == 300
    assert len(target_caught_up(lab, 300)) == 300
    # tcpcopyctl metrics: every daemon of the host, checked by promtool
    out = subprocess.run([*command("tcpcopyctl"), "metrics"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    check = promtool_check(out.stdout)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f'tcpcopyd_state{{instance_name="{lab.ns.prefix}-tcpcopyd",state="healthy"}} 1' \
        in out.stdout
    assert f'interceptd_state{{instance_name="{lab.ns.prefix}-interceptd",' \
           f'state="healthy"}} 1' in out.stdout
    # --output: written whole, for node-exporter's textfile collector
    prom = os.path.join(lab.dir, "tcpcopyd.prom")
    subprocess.run([*command("tcpcopyctl"), "metrics", "--output", prom], check=True,
                   timeout=60)
    with open(prom) as f:
        assert promtool_check(f.read()).returncode == 0
    assert not [n for n in os.listdir(lab.dir) if n.startswith(".tcpcopyd-metrics.")]
    # the master's metrics_listen, scraped by Prometheus in the online host's namespace
    conf = os.path.join(lab.dir, "prometheus.yml")
    with open(conf, "w") as f:
        f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                "scrape_configs:\n  - job_name: tcpcopyd\n    static_configs:\n"
                f"      - targets: ['127.0.0.1:{METRICS_PORT}']\n")
    lab.start("prometheus", lab.ns.online,
              ["prometheus", f"--config.file={conf}",
               f"--storage.tsdb.path={os.path.join(lab.dir, 'tsdb')}",
               f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"])

    def query(expr: str) -> list:
        url = (f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/query?"
               + urllib.parse.urlencode({"query": expr}))
        res = lab.ns.run(lab.ns.online, ["curl", "-sf", url], check=False)
        if res.returncode != 0:
            return []
        return json.loads(res.stdout)["data"]["result"]

    def scraped() -> bool:
        sent = query("tcpcopyd_sent_total")
        return bool(sent) and float(sent[0]["value"][1]) > 0
    try:
        wait_for(scraped, 60, "Prometheus to scrape tcpcopyd_sent_total > 0")
        [up] = query('up{job="tcpcopyd"}')
        assert up["value"][1] == "1"
        [healthy] = query('tcpcopyd_state{state="healthy"}')
        assert healthy["value"][1] == "1"
        assert len(query("tcpcopyd_worker_captured_total")) >= 1
    finally:
        lab.stop("prometheus")


@pytest.mark.parametrize("lab", [{"memcached": False}], indirect=True)
def test_the_capture_interface_down_for_2s_under_load(lab):
    """tcpcopyd notices its interface going down (netlink), says so in status, resumes
    when it comes back, and counts the gap; no worker dies of it."""
    client = load.paced_keepalive(lab, connections=20, per_connection=150, rate=300)
    try:
        wait_for(lambda: len(lab.nginx_log("online")) >= 600, 60, "600 requests online")
        lab.ns.run(lab.ns.online, ["ip", "link", "set", "eth0", "down"])
        try:
            lab.wait_log("tcpcopyd", "eth0 is down: nothing to capture")
            wait_for(lambda: state_is(lab, "down", 3), 10, "status to say down")
            assert "the capture interface eth0 is down" in status(lab)[1]["problems"]
            time.sleep(2.0)                     # the gap: 2 s without the interface
        finally:
            lab.ns.run(lab.ns.online, ["ip", "link", "set", "eth0", "up"])
        lab.wait_log("tcpcopyd", "eth0 is up again after")
        client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    wait_for(lambda: state_is(lab, "healthy", 0), 30, "status to say healthy again")
    rc, d = status(lab)
    assert d["totals"]["interface_downs"] == 1
    assert d["totals"]["interface_down_ms"] >= 1500
    assert d["totals"]["interface_down"] == 0
    assert [w["restarts"] for w in d["workers"]] == [0] * len(d["workers"])
    # the sessions after it are copied
    before = len(lab.nginx_log("target"))
    r = load.h2load(lab, requests=300, rate=300)
    assert r.succeeded == 300
    assert len(target_caught_up(lab, before + 300)) - before == 300
