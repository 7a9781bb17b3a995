"""Never silently behind: a tcpcopyd worker that falls behind (stalled on purpose under a
real load) drops what is older than --max-lag, counted, hands on nothing older, and the
copy goes on live; the lag is a live figure in the shm counters (tcpcopyctl status), and
the worker says in the log that it does not keep up and how to share the load."""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from shm import segment as shmseg
from tcpcopyd.health import status
from tcpcopyd.lab import load
from tcpcopyd.lab.lab import wait_for
from tests.lab.conftest import target_caught_up

pytestmark = pytest.mark.lab

MAX_LAG = 0.5
# what a copied request may take beyond the capture lag: the worker's own turn, pacing on
# the target's answer to the previous request, the target's nginx (seconds)
SLACK = 0.25


@pytest.mark.parametrize("lab", [{"memcached": False, "tcpcopyd": False}], indirect=True)
def test_a_worker_that_falls_behind_drops_what_is_too_old_and_stays_live(lab):
    # one worker, always (a pool that grows would share the load once it lags)
    lab.start_tcpcopyd(ports=[80], extra=["--max-lag", str(MAX_LAG), "--workers", "1"])
    seg = shmseg.attach(f"{lab.ns.prefix}-tcpcopyd")
    [worker] = psutil.Process(lab.procs["tcpcopyd"].pid).children()
    client = load.paced_keepalive(lab, connections=50, per_connection=200, rate=1000)
    peaks = []
    try:
        wait_for(lambda: len(lab.nginx_log("online")) >= 2000, 60, "2000 requests online")
        os.kill(worker.pid, signal.SIGSTOP)      # it falls 2 s behind the capture
        time.sleep(2.0)
        os.kill(worker.pid, signal.SIGCONT)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            peaks.append(status.totals(seg)["capture_lag_peak_ms"])
            time.sleep(0.05)
        client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    c = status.totals(seg)
    seg.close()
    print(f"stalled 2 s: lag_drops {c['lag_drops']}, handed-on lag peaks after it "
          f"{max(peaks)} ms (max-lag {MAX_LAG * 1000:.0f} ms), kernel drops "
          f"{c['kernel_drops']}")
    assert c["lag_drops"] > 0
    said = [line for line in lab.log_text("tcpcopyd").splitlines()
            if "worker 1/1 does not keep up: " in line]
    assert len(said) == 1, said             # once a minute at most
    assert "captured packets dropped" in said[0] and "workers = " in said[0]
    assert max(peaks) <= MAX_LAG * 1000
    # measured apart from the worker's own sampling: each request the target got came at
    # most MAX_LAG (+ SLACK) after the online server got it — what the stall left older
    # was dropped, not copied late (without --max-lag these delays reach the 2 s stall)
    online = {f[6]: float(f[8]) for f in lab.nginx_log("online")}
    delays = [float(f[8]) - online[f[6]] for f in lab.nginx_log("target") if f[6] in online]
    assert delays and max(delays) <= MAX_LAG + SLACK, \
        f"{sum(d > MAX_LAG + SLACK for d in delays)} copies later than {MAX_LAG + SLACK}s " \
        f"(worst {max(delays):.2f}s)"
    # the copy goes on, live: a new load afterwards is replicated whole
    before = len(lab.nginx_log("target"))
    r = load.h2load(lab, requests=1000, rate=500)
    assert r.succeeded == 1000
    assert len(target_caught_up(lab, before + 1000)) - before == 1000
