"""The Debian packages: built from this tree with dpkg-buildpackage (lintian without
errors), then installed in a Debian 12 guest booted with systemd as PID 1, where
tests/system/guest-checks.sh starts, reloads and stops the units (tools/boot-test); the
container image made from them (tools/build-image), and both daemons run from it in the
lab."""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess

import psutil
import pytest

from tcpcopyd.ctl.docs import ROOT
from tcpcopyd.lab import load
from tcpcopyd.lab.net import ONLINE_IP, TARGET_IP
from tests.lab.conftest import target_caught_up

pytestmark = [pytest.mark.lab, pytest.mark.system]


def run(tool: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "tools" / tool)], capture_output=True, text=True,
                          errors="replace", timeout=timeout)


@pytest.mark.timeout(900)
def test_debs_build_with_no_lintian_error():
    r = run("build-debs", 880)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "lintian found no errors" in r.stdout
    built = sorted(os.path.basename(p).split("_")[0]
                   for p in glob.glob(str(ROOT / "dist/debs/*.deb")))
    # the -dbgsym packages hold the debug symbols of the compiled code (NetfilterQueue's
    # binding, tcpcopyd-common's per-packet path)
    assert built == ["interceptd", "python3-netfilterqueue", "python3-netfilterqueue-dbgsym",
                     "tcpcopyd", "tcpcopyd-common", "tcpcopyd-common-dbgsym"]
    [common] = glob.glob(str(ROOT / "dist/debs/tcpcopyd-common_*.deb"))
    listing = subprocess.run(["dpkg", "-c", common], capture_output=True, text=True,
                             check=True).stdout
    assert "tcpcopyd_native__mypyc.cpython" in listing, "the compiled per-packet path is missing"


@pytest.mark.timeout(900)
def test_units_start_reload_and_stop_under_systemd():
    if not glob.glob(str(ROOT / "dist/debs/tcpcopyd_*.deb")):
        pytest.fail("no package built (test_debs_build_with_no_lintian_error failed?)")
    r = run("boot-test", 880)
    report = r.stdout + r.stderr
    assert r.returncode == 0, report[-8000:]
    failed = [line for line in report.splitlines() if line.startswith("FAIL ")]
    assert not failed
    assert report.count("\nPASS ") >= 30
    assert "GUEST-CHECKS-DONE failures=0" in report


# ------------------------------------------------------------------ the container image
@pytest.mark.timeout(900)
def test_the_image_builds_from_the_packages():
    if not glob.glob(str(ROOT / "dist/debs/tcpcopyd_*.deb")):
        pytest.fail("no package built (test_debs_build_with_no_lintian_error failed?)")
    r = subprocess.run([str(ROOT / "tools" / "build-image"), "--save"], capture_output=True,
                       text=True, errors="replace", timeout=880)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert re.search(r"localhost/tcpcopyd:\S+ \(and :latest\), \d+ MiB, 1 layer", r.stdout)
    inspect = json.loads(subprocess.run(["podman", "image", "inspect",
                                         "localhost/tcpcopyd:latest"], capture_output=True,
                                        text=True, check=True).stdout)[0]
    assert "tcpcopyctl status" in " ".join(inspect["Healthcheck"]["Test"])
    assert inspect["Config"]["StopSignal"] == "SIGTERM"
    assert glob.glob(str(ROOT / "dist/tcpcopyd-*.oci.tar"))


@pytest.fixture(scope="module")
def image_root():
    """The image's root file system, mounted read-only (podman image mount)."""
    if subprocess.run(["podman", "image", "exists", "localhost/tcpcopyd:latest"]).returncode:
        pytest.fail("no image built (test_the_image_builds_from_the_packages failed?)")
    # by its id: the same image is unmounted even if :latest moved meanwhile
    image = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}",
                            "localhost/tcpcopyd:latest"], capture_output=True, text=True,
                           check=True).stdout.strip()
    path = subprocess.run(["podman", "image", "mount", image], capture_output=True,
                          text=True, check=True).stdout.strip()
    yield path
    subprocess.run(["podman", "image", "unmount", image], capture_output=True)
    mounted = subprocess.run(["podman", "image", "mount"], capture_output=True,
                             text=True).stdout
    assert image not in mounted, "the image's file system is still mounted"


def capabilities(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^CapEff:\s*(\w+)", f.read(), re.M).group(1), 16)


@pytest.mark.parametrize("lab", [{"image": True, "tcpcopyd": False, "interceptd": False}],
                         indirect=True)
def test_both_daemons_from_the_image_copy_everything_with_their_capabilities_only(lab):
    """tcpcopyd and interceptd from the image's root file system, each in its lab host's
    network namespace with only the capabilities deploy/kubernetes grants: short and
    keep-alive HTTP copied whole, nothing leaked (the fixture); from inside the container,
    as `kubectl exec` runs them, the image's tcpcopyctl reads their status, runs the
    doctor and the comparison report; metrics are scraped, a reload is applied."""
    compare = f"/run/tcpcopyd/{lab.ns.prefix}-compare.jsonl"
    # the shared secret as a mounted Secret is: a file of root's, 0400
    secret = f"/run/tcpcopyd/{lab.ns.prefix}-secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    os.write(fd, os.urandom(24).hex().encode())
    os.close(fd)
    try:
        lab.start_interceptd(extra=["--secret-file", secret])
        lab.start_tcpcopyd(extra=["--metrics-listen", "127.0.0.1:9464", "--compare",
                                  "--compare-log", compare, "--secret-file", secret])
        check_from_the_image(lab, compare, secret)
    finally:
        for path in (compare, secret):
            if os.path.exists(path):
                os.unlink(path)


def check_from_the_image(lab, compare: str, secret: str) -> None:
    r = load.h2load(lab, requests=2000, rate=500)
    assert r.succeeded == 2000, r.output
    keepalive = load.paced_keepalive(lab, connections=20, per_connection=50, rate=400,
                                     host=ONLINE_IP)
    assert load.kv(keepalive.communicate(timeout=300)[0]) == {"ok": 1000, "errors": 0}
    online = sorted((f[0], f[1], f[6]) for f in lab.nginx_log("online"))
    target = target_caught_up(lab, 3000)
    assert sorted((f[0], f[1], f[6]) for f in target) == online
    net_raw_admin = 1 << 12 | 1 << 13
    for name in ("tcpcopyd", "interceptd"):
        # the daemon's master (the container's PID 1) holds both, its workers fewer
        daemon = [capabilities(p.pid) for p in
                  psutil.Process(lab.procs[name].pid).children(recursive=True)
                  if p.name() != "systemd-nspawn"]
        assert daemon and max(daemon) == net_raw_admin, (name, daemon)
        assert all(c & ~net_raw_admin == 0 for c in daemon), (name, daemon)
    # tcpcopyctl of the image, in the daemon's container (as `kubectl exec` runs it): its
    # file system and its processes
    [master] = [p for p in psutil.Process(lab.procs["tcpcopyd"].pid).children(recursive=True)
                if p.name() != "systemd-nspawn"][:1]
    status = subprocess.run(["nsenter", "--target", str(master.pid), "--mount", "--pid",
                             "--", "tcpcopyctl", "status", "--json",
                             f"{lab.ns.prefix}-tcpcopyd"],
                            capture_output=True, text=True, timeout=60)
    [d] = json.loads(status.stdout)
    assert d["state"] == "healthy" and d["totals"]["sessions_opened"] == 2020
    doctor = subprocess.run(["nsenter", "--target", str(master.pid), "--mount", "--pid",
                             "--net", "--", "tcpcopyctl", "doctor", "tcpcopyd", "-x",
                             f"80-{TARGET_IP}:80", "-s", TARGET_IP, "-i", "eth0",
                             "--secret-file", secret],
                            capture_output=True, text=True, timeout=60)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "OK    control port: " in doctor.stdout
    metrics = lab.ns.run(lab.ns.online, ["curl", "-sS", "http://127.0.0.1:9464/metrics"])
    assert re.search(r"^tcpcopyd_sessions_opened_total\{[^}]*\} 2020$", metrics.stdout, re.M)
    report = subprocess.run(["nsenter", "--target", str(master.pid), "--mount", "--pid",
                             "--", "tcpcopyctl", "report", compare, "--json"],
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["exchanges"] > 0
    os.kill(master.pid, signal.SIGHUP)
    lab.wait_log("tcpcopyd", "reload: applied nothing changed")
