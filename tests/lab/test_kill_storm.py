"""200 SIGKILLs of workers of both daemons at random moments under load: the service recovers
every time (a new worker boots), never enters a crash loop, and the sessions held in the
shared table go on — long-lived keep-alive connections that span the whole storm still get
their last request to the target. A worker killed in the middle of writing a session slot
leaves it torn; the next worker clears it (counted sessions_torn) instead of dying."""
from __future__ import annotations

import os
import random
import signal
import statistics
import time
from collections import defaultdict, deque

import pytest

from shm import segment as shmseg
from shm import seqlock
from shm.table import SlotTable
from tcpcopyd.health import status
from tcpcopyd.lab import load
from tcpcopyd.lab.lab import wait_for
from tcpcopyd.online.session import SLOT
from tcpcopyd.service import arbiter
from tests.lab.conftest import target_caught_up

pytestmark = pytest.mark.lab

KILLS = int(os.environ.get("TCPCOPYD_KILL_STORM", "200"))
LONG_CONNECTIONS = 40
LONG_INTERVAL = 0.1          # each long connection asks every 0.1 s: 400 req/s in all
# share of the requests during the storm that may go unreplicated (0.31 % measured on
# 2026-11-30, 6 % in a CI-like run on 2026-12-02 on this busier 2-core machine)
LOSS_BOUND = 0.1
# kills of one worker index within the arbiter's crash window stay below a crash loop
PER_WINDOW = arbiter.CRASH_LOOP_DEATHS - 1
WINDOW = arbiter.CRASH_WINDOW + 1.0


def booted_pid(seg: shmseg.Segment, index: int) -> int | None:
    """The pid of worker ``index`` if it is alive and booted (fresh heartbeat of its own)."""
    try:
        rec = seg.read_worker(index)
    except seqlock.TornRead:
        return None
    if not rec.pid or time.time() - rec.heartbeat > 2.0:
        return None
    try:
        os.kill(rec.pid, 0)
    except ProcessLookupError:
        return None
    return rec.pid


def last_seen(log: list[list[str]], i: int) -> list[str] | None:
    """The target's last log line of long connection ``i``."""
    lines = [f for f in log if f[6].startswith(f"/?long={i}&")]
    return lines[-1] if lines else None


def sessions_of(seg: shmseg.Segment, log: list[list[str]], missing: list[int]) -> list:
    """The shm slots of the sessions of the long connections ``missing`` (for a failure's
    message): state, sequence numbers, retransmissions."""
    ports = {int(last_seen(log, i)[1]) for i in missing if last_seen(log, i)}
    table = SlotTable(seg, SLOT)
    out = []
    for slot in range(seg.n_slots):
        try:
            v = table.read(slot)
        except seqlock.TornRead:
            continue
        if v.state and v.client_port in ports:
            out.append({k: getattr(v, k) for k in ("client_port", "state", "isn", "snd_una",
                                                  "snd_nxt", "cap_nxt", "rcv_nxt",
                                                  "retransmits")})
    return out


@pytest.mark.parametrize("lab", [{"memcached": False, "workers": 2}], indirect=True)
def test_two_hundred_sigkills_under_load_the_service_recovers_every_time(lab):
    segs = {name: shmseg.attach(f"{lab.ns.prefix}-{name}")
            for name in ("tcpcopyd", "interceptd")}
    masters = {name: lab.procs[name] for name in segs}
    slots = [(name, i) for name, seg in segs.items() for i in range(seg.n_workers)]
    seed = int(os.environ.get("TCPCOPYD_KILL_SEED", time.time()))
    rng = random.Random(seed)
    kills: dict[tuple, deque] = defaultdict(deque)   # recent kill times per worker
    killed: dict[tuple, int] = defaultdict(int)
    recoveries = []
    long = load.long_keepalive(lab, connections=LONG_CONNECTIONS, interval=LONG_INTERVAL)
    try:
        wait_for(lambda: len(lab.nginx_log("target")) >= 4 * LONG_CONNECTIONS, 60,
                 "the long connections to reach the target")
        while len(recoveries) < KILLS:
            n = len(recoveries)
            now = time.monotonic()
            for q in kills.values():
                while q and q[0] < now - WINDOW:
                    q.popleft()
            eligible = [s for s in slots if len(kills[s]) < PER_WINDOW]
            if not eligible:
                time.sleep(0.1)
                continue
            name, index = rng.choice(eligible)
            seg = segs[name]
            wait_for(lambda seg=seg, index=index: booted_pid(seg, index) is not None, 30,
                     f"{name} worker {index + 1} to serve")
            time.sleep(rng.uniform(0.0, 0.3))      # a random moment of its work
            victim = booted_pid(seg, index)
            os.kill(victim, signal.SIGKILL)
            t0 = time.monotonic()
            kills[(name, index)].append(t0)
            killed[(name, index)] += 1
            wait_for(lambda seg=seg, index=index, victim=victim:
                     booted_pid(seg, index) not in (None, victim), 30,
                     f"{name} worker {index + 1} to recover from kill {n + 1} (seed {seed})")
            recoveries.append(time.monotonic() - t0)
            for m, p in masters.items():
                assert p.poll() is None, f"{m} stopped after kill {n + 1}:\n{lab.log_text(m)}"
        online_during = len(lab.nginx_log("online"))
        long.send_signal(signal.SIGUSR1)
        out, _ = long.communicate(timeout=60)
    finally:
        if long.poll() is None:
            long.kill()
            long.wait()
    assert len(recoveries) == KILLS
    result = load.kv(out)
    # every long connection spanned the storm and its last request reached the target
    assert result["final"] == LONG_CONNECTIONS, out
    target = target_caught_up(lab, len(lab.nginx_log("online")), timeout=30)
    finals = {f[6] for f in target if f[6].startswith("/?final=")}
    missing = [i for i in range(LONG_CONNECTIONS) if f"/?final={i}" not in finals]
    assert not missing, (f"last requests of long connections {missing} not on the target; "
                         f"last seen there: {[last_seen(target, i) for i in missing]}; "
                         f"their sessions: {sessions_of(segs['tcpcopyd'], target, missing)}; "
                         f"{ {name: status.totals(seg) for name, seg in segs.items()} }")
    for name, seg in segs.items():
        assert "crash loop" not in lab.log_text(name)
        # each kill was answered by exactly one new worker, shown in the segment
        assert [seg.read_worker(i).restarts for i in range(seg.n_workers)] == \
            [killed[(name, i)] for i in range(seg.n_workers)]
    # after the storm the pair replicates a fresh load whole
    before = len(lab.nginx_log("target"))
    r = load.h2load(lab, requests=2000, rate=500)
    assert r.succeeded == 2000
    assert len(target_caught_up(lab, before + 2000)) - before == 2000
    c = status.totals(segs["tcpcopyd"])
    assert c["sessions_restored"] > 0      # killed workers' sessions were carried on
    lost = online_during - len([f for f in target if not f[6].startswith("/?final=")])
    print(f"{KILLS} kills (seed {seed}): recovery p50 {statistics.median(recoveries):.3f}s, "
          f"max {max(recoveries):.3f}s; during the storm {lost} of {online_during} requests "
          f"not replicated; tcpcopyd sessions restored {c['sessions_restored']}, "
          f"torn {c['sessions_torn']}, resynced {c['sessions_resynced']}, stale target "
          f"connections reset {c['stale_connections_reset']}")
    # what a kill may lose is what the killed worker held (captured, not yet sent or
    # acknowledged): 0.31 % in BENCHMARKS.md; without the shm table carrying the sessions
    # on, every session of a killed worker would be lost from then on
    assert lost <= online_during * LOSS_BOUND, \
        f"{lost} of {online_during} requests not replicated during the storm"
    for seg in segs.values():
        seg.close()
