"""The comparison test in the lab: the online and the target nginx differ on purpose — /fail
answers 500 on the target, /slow.bin comes slowly from the target, /stamp carries a header
that differs between any two answers — and the report finds exactly those; memcached gets
are compared the same way. The HTML report is opened in a real headless browser."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from tcpcopyd.lab import load
from tcpcopyd.lab.lab import MEMCACHED_PORT, command, wait_for
from tcpcopyd.lab.net import ONLINE_IP
from tests.lab.conftest import target_caught_up

pytestmark = pytest.mark.lab

BOTH = 'location = /stamp { add_header X-Request-Id $request_id; return 200 "stamp\\n"; }\n'
ONLINE = BOTH + 'location = /fail { return 200 "fine\\n"; }\n'
TARGET = BOTH + ('location = /fail { return 500; }\n'
                 'location = /slow.bin { limit_rate 256k; }\n')
WORKLOAD = {"/fail": 40, "/slow.bin": 20, "/stamp": 40, "/": 40}
GETS = 300


def records(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def report(log: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*command("tcpcopyctl"), "report", log, *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("lab", [{"tcpcopyd": False,
                                  "nginx_extra": {"online": ONLINE, "target": TARGET}}],
                         indirect=True)
def test_the_report_finds_what_differs_and_only_that(lab, tmp_path):
    log = os.path.join(lab.dir, "compare.jsonl")
    lab.start_tcpcopyd(extra=["--compare", "--compare-log", log,
                              "--compare-ignore", "Date,X-Request-Id"])

    def warm() -> bool:
        """interceptd's workers learn at their next sync (0.1 s) that a tcpcopyd wants
        the answers' first bytes: an exchange whose target status is known says so."""
        load.h2load(lab, requests=1, rate=1, path="/warm")
        return any(r["path"] == "/warm" and (r["target"] or {}).get("status")
                   for r in records(log))
    wait_for(warm, 30, "an exchange with the target's status")
    for path, n in WORKLOAD.items():
        r = load.h2load(lab, requests=n, rate=100, path=path)
        assert r.requests == n
    sets = load.python_in(lab, lab.ns.client, load.MEMCACHED_SETS, ONLINE_IP,
                          MEMCACHED_PORT, GETS, "cmp")
    assert "failed=0" in sets.stdout
    # the gets must not overtake the copies of the sets on their way to the target
    wait_for(lambda: sum(1 for r in records(log) if r["request"].startswith("set ")) >= GETS,
             60, f"{GETS} sets compared")
    gets = load.python_in(lab, lab.ns.client, load.MEMCACHED_GET, ONLINE_IP,
                          MEMCACHED_PORT, GETS, "cmp")
    assert f"ok={GETS}" in gets.stdout
    warmed = sum(1 for f in lab.nginx_log("online") if f[6] == "/warm")
    target = target_caught_up(lab, warmed + sum(WORKLOAD.values()))
    assert sum(1 for f in target if f[6] != "/warm") == sum(WORKLOAD.values())
    http = sum(WORKLOAD.values())

    def logged() -> bool:
        recs = records(log)
        return sum(1 for r in recs if r["path"].startswith("/")) >= http and \
            sum(1 for r in recs if r["request"].startswith("get ")) >= GETS // 100
    wait_for(logged, 90, f"{http} HTTP exchanges and the gets in {log}")
    recs = records(log)
    by_path = {p: [r for r in recs if r["path"] == p] for p in WORKLOAD}
    assert all(len(by_path[p]) == n for p, n in WORKLOAD.items()), \
        {p: len(v) for p, v in by_path.items()}
    assert all(r["online"]["status"] == "200" and r["target"]["status"] == "500"
               for r in by_path["/fail"])
    assert all(r["same_status"] and r["same_content"] for p in ("/", "/stamp")
               for r in by_path[p])
    gets = [r for r in recs if r["request"].startswith("get ")]
    assert gets and all(r["same_status"] and r["same_size"] and r["same_content"]
                        for r in gets)
    # the summary
    out = report(log, "--json")
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["exchanges"] == s["compared"] == len(recs)
    assert s["online_only"] == s["target_only"] == 0
    differ = [(r["path"], r["online"]["size"], r["target"]["size"]) for r in recs
              if r.get("same_size") is False and r["path"] != "/fail"]
    assert s["size_differences"] == WORKLOAD["/fail"], differ[:20]
    assert s["status_mismatches"] == WORKLOAD["/fail"]
    assert s["status_mismatch_pairs"] == {"200→500": WORKLOAD["/fail"]}
    assert s["status_mismatches_by_path"] == {"/fail": WORKLOAD["/fail"]}
    assert s["content_differences"] == WORKLOAD["/fail"]
    slow = next(p for p in s["slowest_paths"] if p["path"] == "/slow.bin")
    assert s["slowest_paths"][0]["path"] == "/slow.bin"
    assert slow["ratio"] > 5, slow
    for side in ("online_latency_ms", "target_latency_ms"):
        assert set(s[side]) == {"p50", "p90", "p99"}
    # without the rule for X-Request-Id, /stamp differs too; an expression does as well
    again = json.loads(report(log, "--json", "--ignore", "Date").stdout)
    assert again["content_differences"] == WORKLOAD["/fail"] + WORKLOAD["/stamp"]
    again = json.loads(report(log, "--json", "--ignore", "Date", "--ignore",
                              "re:[0-9a-f]{32}").stdout)
    assert again["content_differences"] == WORKLOAD["/fail"]
    text = report(log).stdout
    assert "200→500: 40" in text and "/slow.bin" in text
    # the page, in a real browser
    page = os.path.join(lab.dir, "report.html")
    assert report(log, "--html", page).returncode == 0
    browser = shutil.which("chromium")
    assert browser, "chromium is missing: tools/setup.sh installs it"
    shot = os.path.join(os.environ.get("TCPCOPYD_TEST_OUTPUT", str(tmp_path)),
                        "compare-report.png")
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--window-size=1280,2400"]
    subprocess.run([*args, f"--screenshot={shot}", f"file://{page}"], capture_output=True,
                   timeout=120, check=True)
    assert os.path.getsize(shot) > 10000
    dom = subprocess.run([*args, "--dump-dom", f"file://{page}"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    shown = dict(re.findall(r'<td id="([\w.]+)">([^<]*)</td>', dom))
    for key in ("exchanges", "compared", "status_mismatches", "content_differences"):
        assert shown[key] == str(s[key]), key
    for side in ("online", "target"):
        for q in ("p50", "p90", "p99"):
            assert float(shown[f"{side}_latency_ms.{q}"]) == pytest.approx(
                s[f"{side}_latency_ms"][q], abs=0.01)
    assert dom.count("<svg") >= 2
