"""The Debian packages: built from this tree with dpkg-buildpackage (lintian without
errors), then installed in a Debian 12 guest booted with systemd as PID 1, where
tests/system/guest-checks.sh starts, reloads and stops the units (tools/boot-test)."""
from __future__ import annotations

import glob
import os
import subprocess

import pytest

from tcpcopyd.ctl.docs import ROOT

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
