"""`tcpcopyctl status [--json] [NAME]`: every running tcpcopyd/interceptd on this host, read
from their shm segments (counters, heartbeats, live settings) and psutil (CPU, memory,
uptime). `tcpcopyctl doctor`: see tcpcopyd.doctor."""
from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence

import psutil

from interceptd import counters as icounters
from shm import segment as shmseg
from shm import seqlock
from tcpcopyd import counters as tcounters

KINDS = {1: ("tcpcopyd", tcounters), 2: ("interceptd", icounters)}
# a worker whose heartbeat is older than this is reported stale
STALE_SECONDS = 5.0


def dumps(obj: object) -> str:
    """JSON, with orjson when it is installed (the Debian packages make it optional)."""
    try:
        import orjson
    except ImportError:
        import json
        return json.dumps(obj, indent=2)
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode()


def find_segments() -> tuple[list[shmseg.Segment], list[str]]:
    """The segments of the runtime directory we can trust, and why the others were
    skipped (another owner, writable by others, not a segment of this release ...)."""
    out, skipped = [], []
    for name in shmseg.list_segments(""):
        try:
            seg = shmseg.attach(name)
        except shmseg.SegmentError as e:
            skipped.append(str(e))
            continue
        if seg.kind not in KINDS:
            skipped.append(f"{seg.path}: unknown kind {seg.kind}")
            seg.close()
            continue
        out.append(seg)
    return out, skipped


def worker_pids(seg: shmseg.Segment) -> list[int]:
    out = []
    for i in range(seg.n_workers):
        try:
            out.append(seg.read_worker(i).pid)
        except seqlock.TornRead:
            pass
    return out


def proc_info(pid: int) -> dict:
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            return {"pid": pid, "cpu_percent": p.cpu_percent(interval=None),
                    "rss_bytes": p.memory_info().rss, "uptime_s": time.time() - p.create_time(),
                    "cpus": sorted(p.cpu_affinity()), "title": " ".join(p.cmdline())}
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {"pid": pid, "alive": False}


def totals(seg: shmseg.Segment) -> dict[str, int]:
    """The counters of a daemon's workers added up, by name."""
    _, counters = KINDS.get(seg.kind, ("", None))
    return seg.totals(counters.NAMES if counters else ())


def describe(seg: shmseg.Segment, before: dict[str, int] | None = None,
             elapsed: float = 0.0) -> dict:
    prog, counters = KINDS.get(seg.kind, (f"kind{seg.kind}", None))
    master = proc_info(seg.master_pid)
    now = time.time()
    workers, totals = [], {}
    problems = []
    if master.get("alive") is False:
        problems.append(f"master pid {seg.master_pid} is not running")
    for i in range(seg.n_workers):
        try:
            rec = seg.read_worker(i)
        except seqlock.TornRead:
            problems.append(f"worker {i + 1} stopped in the middle of updating its record")
            continue
        info = proc_info(rec.pid) if rec.pid else {"pid": 0, "alive": False}
        age = now - rec.heartbeat if rec.heartbeat else None
        names = counters.NAMES if counters else ()
        vals = dict(zip(names, rec.counters, strict=False))
        for k, v in vals.items():
            totals[k] = totals.get(k, 0) + v
        if age is None or age > STALE_SECONDS:
            problems.append(f"worker {i + 1} heartbeat "
                            + ("missing" if age is None else f"{age:.1f}s old"))
        if rec.respawn_at > now:
            problems.append(f"worker {i + 1} {exit_words(rec.last_exit)}; the next one "
                            f"starts in {rec.respawn_at - now:.1f}s")
        workers.append({"index": i + 1, "cpu": rec.cpu, "restarts": rec.restarts,
                        "recent_deaths": rec.recent_deaths,
                        "last_exit": exit_words(rec.last_exit)
                        if rec.restarts or rec.recent_deaths else None,
                        "respawn_in_s": max(0.0, rec.respawn_at - now) if rec.respawn_at
                        else None,
                        "heartbeat_age_s": age, **info, "counters": vals})
    # sample CPU% over a short interval for master and workers
    gauges = counters.GAUGES if counters else frozenset()
    rates = {k: (v - before.get(k, 0)) / elapsed for k, v in totals.items()
             if before is not None and elapsed > 0 and k not in gauges}
    try:
        live = seg.read_settings()
    except (seqlock.TornRead, ValueError):
        live = {}
    return {"name": seg.name, "program": prog, "label": seg.label, "master": master,
            "settings": live,
            "workers": workers, "totals": totals, "rates_per_s": rates,
            "healthy": not problems, "problems": problems}


def render(d: dict) -> str:
    lines = [f"{d['program']} {d['name']} [{d['label']}]: "
             + ("healthy" if d["healthy"] else "UNHEALTHY: " + "; ".join(d["problems"]))]
    m = d["master"]
    lines.append(f"  master   pid {m['pid']:<7} "
                 + (f"cpu {m.get('cpu_percent', 0):5.1f}%  rss {m.get('rss_bytes', 0) >> 20} MiB"
                    f"  up {m.get('uptime_s', 0):.0f}s" if m.get("alive", True) else "not running"))
    for w in d["workers"]:
        hb = w["heartbeat_age_s"]
        lines.append(
            f"  worker {w['index']} pid {w['pid']:<7} cpu={w['cpu']} "
            + (f"cpu {w.get('cpu_percent', 0):5.1f}%  rss {w.get('rss_bytes', 0) >> 20} MiB  "
               f"up {w.get('uptime_s', 0):.0f}s" if w.get("alive", True) else "not running")
            + f"  restarts {w['restarts']}"
            + (f" ({w['recent_deaths']} recent, last {w['last_exit']})"
               if w["recent_deaths"] else "")
            + "  heartbeat "
            + ("-" if hb is None else f"{hb:.1f}s ago"))
    if d.get("settings"):
        lines.append("  settings " + " ".join(f"{k}={_short(v)}" for k, v in
                                              sorted(d["settings"].items())))
    width = max((len(k) for k in d["totals"]), default=0)
    for k, v in d["totals"].items():
        if v:
            rate = d["rates_per_s"].get(k)
            lines.append(f"    {k:<{width}} {v:>12}" + (f"  {rate:10.1f}/s" if rate else ""))
    return "\n".join(lines)


def _short(v: object) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    return "-" if v is None else str(v)


def exit_words(code: int) -> str:
    """How a worker ended, from its supervision record (-N: killed by signal N)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def status(args: argparse.Namespace) -> int:
    found, skipped = find_segments()
    for why in skipped:
        print(f"tcpcopyctl: skipped {why}", file=sys.stderr)
    segs = [s for s in found if not args.name or s.name == args.name]
    if not segs:
        print("tcpcopyctl: no tcpcopyd or interceptd is running on this host"
              + (f" under the name {args.name!r}" if args.name else ""), file=sys.stderr)
        return 3
    # prime psutil's CPU counters, then measure over a short interval
    for s in segs:
        for pid in [s.master_pid, *worker_pids(s)]:
            try:
                psutil.Process(pid).cpu_percent(interval=None)
            except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
                pass
    before = [totals(s) for s in segs]
    t0 = time.monotonic()
    time.sleep(0.5)
    elapsed = time.monotonic() - t0
    report = [describe(s, b, elapsed) for s, b in zip(segs, before, strict=True)]
    if args.json:
        sys.stdout.write(dumps(report) + "\n")
    else:
        print("\n\n".join(render(d) for d in report))
    return 0 if all(d["healthy"] for d in report) else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tcpcopyctl", description="Inspect tcpcopyd/interceptd.")
    sub = ap.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="processes, counters and health of running daemons")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("name", nargs="?", help="only this instance (shm segment name)")
    dr = sub.add_parser("doctor", help="check this host's set-up; prints the fix of each "
                        "problem (exit 0: all checks passed)")
    dr.add_argument("--client", default="", metavar="ADDR[,ADDR]",
                    help="client address(es) whose copies the target must answer through "
                    "interceptd (on the target host: checks the return route and rp_filter)")
    dr.add_argument("role", choices=("tcpcopyd", "interceptd"),
                    help="which daemon's host this is")
    dr.add_argument("args", nargs=argparse.REMAINDER,
                    help="the daemon's own flags, or --config FILE [-i IFACE]")
    args = ap.parse_args(argv)
    if args.command == "doctor":
        from tcpcopyd import doctor
        clients = [c.strip() for c in args.client.split(",") if c.strip()]
        return doctor.run(args.role, args.args, clients)
    return status(args)


if __name__ == "__main__":
    sys.exit(main())
