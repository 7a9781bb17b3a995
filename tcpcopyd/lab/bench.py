"""Replication benchmark in the lab: request loss and CPU of each daemon at given rates.

For each rate, ``--runs`` runs on a fresh lab; each run offers ``--requests`` short HTTP
requests (h2load, one request per connection) and counts what the online and the target
nginx logged. CPU is utime+stime of each daemon's master and workers over the run, from
/proc. Prints medians as a Markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

from shm import segment as shmseg
from tcpcopyd import ctl
from tcpcopyd.lab import load
from tcpcopyd.lab.lab import Lab, wait_for


def one_run(rate: int, requests: int, per_connection: int, workers: int, threads: int = 1,
            nginx_workers: int = 1, settle: float = 30.0, cpus: dict[str, str] | None = None,
            assistant: bool = False) -> dict:
    lab = Lab(f"bench{os.getpid() % 1000}", nginx_workers=nginx_workers, cpus=cpus,
              assistant=assistant)
    try:
        lab.up(memcached=False)
        lab.start_interceptd([80], extra=["--queues", str(workers)])
        lab.start_tcpcopyd([80], extra=["--workers", str(workers)])
        cpu0 = {d: lab.daemon_cpu_seconds(d) for d in ("tcpcopyd", "interceptd")}
        r = load.h2load(lab, requests=requests, rate=rate, per_connection=per_connection,
                        threads=threads)
        cpu_load = {d: lab.daemon_cpu_seconds(d) - cpu0[d] for d in cpu0}
        online = len(lab.nginx_log("online"))
        try:
            wait_for(lambda: len(lab.nginx_log("target")) >= online, settle, "target")
        except Exception:
            pass
        cpu = {d: lab.daemon_cpu_seconds(d) - cpu0[d] for d in cpu0}
        target = sum(1 for f in lab.nginx_log("target") if f[2] == "200")
        leaked = sum(lab.ns.leaked().values())
        drops = {}
        for d, name in (("tcpcopyd", "kernel_drops"), ("interceptd", "queue_drops")):
            seg = shmseg.attach(f"{lab.ns.prefix}-{d}")
            drops[f"{d}_{name}"] = ctl.totals(seg).get(name, 0)
            seg.close()
    finally:
        lab.down()
        lab.cleanup_files()
    secs = r.seconds or 1.0
    return {"offered": requests, "online": online, "target": target,
            "loss_pct": 100.0 * (online - target) / online if online else 100.0,
            "load_s": r.seconds, "achieved_per_s": online / secs,
            "client_errors": r.failed + r.errored, "leaked": leaked, **drops,
            # CPU % while the load ran; µs per request including any catching up after it
            **{f"{d}_cpu_pct": 100.0 * c / secs for d, c in cpu_load.items()},
            **{f"{d}_us_per_req": 1e6 * c / max(1, online) for d, c in cpu.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tcpcopyd-bench", description=__doc__)
    ap.add_argument("--rates", default="1000,2000,5000")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--per-connection", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", default="1", help="worker counts per side, e.g. 1,2")
    ap.add_argument("--threads", type=int, default=1, help="h2load threads")
    ap.add_argument("--nginx-workers", type=int, default=1)
    ap.add_argument("--tcpcopyd-cpus", help="CPU list for tcpcopyd (taskset -c), e.g. 0-7")
    ap.add_argument("--interceptd-cpus", help="CPU list for interceptd, e.g. 8-15")
    ap.add_argument("--interception", default="nfqueue",
                    help="where interceptd takes the replies: nfqueue (on the target), "
                    "assistant (AF_PACKET on an assistant host), or both, e.g. "
                    "nfqueue,assistant")
    ap.add_argument("--settle", type=float, default=30.0,
                    help="longest wait for the target to catch up after the load, seconds")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("the benchmark builds network namespaces: run it as root", file=sys.stderr)
        return 1
    rows = []
    counts = [int(x) for x in args.workers.split(",")]
    cpus = {k: v for k, v in (("tcpcopyd", args.tcpcopyd_cpus),
                              ("interceptd", args.interceptd_cpus)) if v}
    modes = args.interception.split(",")
    if not set(modes) <= {"nfqueue", "assistant"}:
        print("--interception: nfqueue, assistant or both", file=sys.stderr)
        return 2
    combos = [(w, m) for w in counts for m in modes]
    for rate in [int(x) for x in args.rates.split(",")]:
        # the combinations alternate run by run, so each meets the same machine noise
        runs: dict[tuple[int, str], list[dict]] = {c: [] for c in combos}
        for _ in range(args.runs):
            for w, m in combos:
                runs[(w, m)].append(one_run(rate, args.requests, args.per_connection, w,
                                            args.threads, args.nginx_workers, args.settle,
                                            cpus, assistant=m == "assistant"))
        for c in combos:
            med = {k: statistics.median(r[k] for r in runs[c]) for k in runs[c][0]}
            rows.append((rate, c, med, runs[c]))
            print(f"rate {rate} workers {c[0]} {c[1]}: " + "; ".join(
                f"loss {r['loss_pct']:.3f}% tcpcopyd {r['tcpcopyd_cpu_pct']:.0f}% "
                f"interceptd {r['interceptd_cpu_pct']:.0f}%" for r in runs[c]), flush=True)
    print()
    print("| offered req/s | achieved req/s | workers per side | interception | requests | "
          "loss % (median) | worst loss % | tcpcopyd CPU % | tcpcopyd µs/req | "
          "interceptd CPU % | interceptd µs/req | capture drops | queue drops | leaked |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rate, (workers, mode), m, runs in rows:
        print(f"| {rate} | {m['achieved_per_s']:.0f} | {workers} | {mode} | {args.requests} | "
              f"{m['loss_pct']:.3f} | "
              f"{max(r['loss_pct'] for r in runs):.3f} | {m['tcpcopyd_cpu_pct']:.0f} | "
              f"{m['tcpcopyd_us_per_req']:.0f} | {m['interceptd_cpu_pct']:.0f} | "
              f"{m['interceptd_us_per_req']:.0f} | {m['tcpcopyd_kernel_drops']:.0f} | "
              f"{m['interceptd_queue_drops']:.0f} | {max(r['leaked'] for r in runs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
