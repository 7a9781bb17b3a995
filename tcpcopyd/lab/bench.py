"""Replication benchmark in the lab: request loss, CPU of each daemon and the copy's added
delay at given rates — ours, and with ``--pairs ours,c`` the C tcpcopy + intercept too, the
two alternating run by run (the C binaries come from TCPCOPYD_C_TCPCOPY and
TCPCOPYD_C_INTERCEPT; they are never part of this repository).

For each rate, ``--runs`` runs on a fresh lab; each run offers ``--requests`` HTTP requests
(h2load; ``--per-connection`` per connection) and counts what the online and the target
nginx logged. CPU is utime+stime of each daemon's processes over the run, from /proc.
With ``--delays``, tcpdump on the online and the target interfaces times each SYN and each
connection's first data segment from one to the other (tcpcopyd.lab.delays). Prints
medians as a Markdown table for BENCHMARKS.md; ``--plot FILE.svg`` draws them.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys

from shm import segment as shmseg
from tcpcopyd import native
from tcpcopyd.health import status
from tcpcopyd.lab import load
from tcpcopyd.lab.delays import copy_delays, percentiles, start_capture, stop_capture
from tcpcopyd.lab.lab import Lab, wait_for
from tcpcopyd.lab.net import ONLINE6_IP, ONLINE_IP, TARGET_IP

C_TCPCOPY = os.environ.get("TCPCOPYD_C_TCPCOPY", "")
C_INTERCEPT = os.environ.get("TCPCOPYD_C_INTERCEPT", "")
# iptables comment of the rule the C intercept's runs need (it installs none itself)
C_RULE_TAG = "tcpcopyd-bench-c-intercept"
# how the table names each pair
PAIR_NAMES = {"c": "C", "compare": "ours --compare", "secret": "ours, secret",
              "pure": "ours, pure Python", "ipv6": "ours, IPv6 clients",
              "mirror": "ours --mirror, on a mirror host", "none": "no copy",
              "image": "ours, from the image"}
PAIRS = ("ours", "c", "compare", "secret", "pure", "ipv6", "mirror", "none", "image")
# the image's root file system, mounted (--pairs image: tools/build-image made it)
IMAGE = "localhost/tcpcopyd:latest"


def start_c_pair(lab) -> None:
    """The C intercept (NFQUEUE 0, with the rule it needs) and the C tcpcopy."""
    lab.ns.run(lab.ns.target, ["iptables", "-w", "5", "-I", "OUTPUT", "-p", "tcp", "--sport",
                               "80", "-m", "comment", "--comment", C_RULE_TAG, "-j",
                               "NFQUEUE", "--queue-num", "0"])
    lab.start("interceptd", lab.ns.target, [C_INTERCEPT, "-l", "/dev/stdout"])
    lab.wait_listening(lab.ns.target, 36524)
    lab.start("tcpcopyd", lab.ns.online, [C_TCPCOPY, "-x", f"80-{TARGET_IP}:80", "-s",
                                          TARGET_IP, "-l", "/dev/stdout"])
    wait_for(lambda: "ESTAB" in lab.ns.run(lab.ns.target, ["ss", "-Htn", "sport = :36524"],
                                           check=False).stdout, 30, "the C tcpcopy to connect")


def write_secret(directory: str) -> str:
    """A shared secret for both daemons (``--pairs secret``), private to root."""
    path = os.path.join(directory, "secret")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, os.urandom(24).hex().encode())
    os.close(fd)
    return path


def one_run(rate: int, requests: int, per_connection: int, workers: int | str,
            threads: int = 1,
            nginx_workers: int = 1, settle: float = 30.0, cpus: dict[str, str] | None = None,
            assistant: bool = False, pair: str = "ours", delays: bool = False) -> dict:
    lab = Lab(f"bench{os.getpid() % 1000}", nginx_workers=nginx_workers, cpus=cpus,
              assistant=assistant, mirror=pair == "mirror")
    captures = {}
    image = None
    if pair == "image":
        image = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", IMAGE],
                               capture_output=True, text=True, check=True).stdout.strip()
        lab.image_root = subprocess.run(["podman", "image", "mount", image],
                                        capture_output=True, text=True,
                                        check=True).stdout.strip()
    try:
        lab.up(memcached=False)
        if pair == "c":
            start_c_pair(lab)
        elif pair != "none":
            both = ["--secret-file", write_secret(lab.dir)] if pair == "secret" else []
            compare = ["--compare", "--compare-log", os.path.join(lab.dir, "compare.jsonl")]
            if pair == "pure":      # the daemons inherit it: their .py sources run
                os.environ[native.PURE_ENV] = "1"
            try:
                # auto: tcpcopyd's pool grows and shrinks, interceptd has its default
                queues = 1 if workers == "auto" else workers
                lab.start_interceptd([80], extra=["--queues", str(queues), *both])
                lab.start_tcpcopyd([80], extra=["--workers", str(workers), *both,
                                                *(compare if pair == "compare" else [])],
                                   ipv6=pair == "ipv6")
            finally:
                os.environ.pop(native.PURE_ENV, None)
        if delays:
            captures = {host: (path, start_capture(lab, getattr(lab.ns, host), path))
                        for host in ("online", "target")
                        for path in [os.path.join(lab.dir, f"{host}.pcap")]}
        cpu0 = {d: lab.daemon_cpu_seconds(d) for d in ("tcpcopyd", "interceptd",
                                                         "nginx-online")}
        client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = load.h2load(lab, requests=requests, rate=rate, per_connection=per_connection,
                        threads=threads,
                        host=f"[{ONLINE6_IP}]" if pair == "ipv6" else ONLINE_IP)
        client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_load = {d: lab.daemon_cpu_seconds(d) - cpu0[d] for d in cpu0}
        # the online side: its nginx and the client that drives it (the lab's veth runs
        # the online host's receive path, tc mirred included, in the client's context)
        online_side = cpu_load.pop("nginx-online") + (client1.ru_utime - client0.ru_utime
                                                       + client1.ru_stime - client0.ru_stime)
        del cpu0["nginx-online"]
        online = len(lab.nginx_log("online"))
        try:
            wait_for(lambda: len(lab.nginx_log("target")) >= online, settle, "target")
        except Exception:
            pass
        cpu = {d: lab.daemon_cpu_seconds(d) - cpu0[d] for d in cpu0}
        target = sum(1 for f in lab.nginx_log("target") if f[2] == "200")
        # how often a pool that grows and shrinks (workers auto) added a worker
        grew = lab.log_text("tcpcopyd").count("the pool grows") if pair != "c" else 0
        leaked = sum(lab.ns.leaked().values())
        drops = {"tcpcopyd_kernel_drops": 0, "interceptd_queue_drops": 0}
        for d, name in (("tcpcopyd", "kernel_drops"), ("interceptd", "queue_drops")):
            if pair not in ("c", "none"):
                seg = shmseg.attach(f"{lab.ns.prefix}-{d}")
                drops[f"{d}_{name}"] = status.totals(seg).get(name, 0)
                seg.close()
        delay = {}
        if captures:
            for _path, p in captures.values():
                stop_capture(p)
            found = copy_delays(captures["online"][0], captures["target"][0])
            delay = {f"{kind}_delay": values for kind, values in found.items()}
    finally:
        for _path, p in captures.values():
            if p.poll() is None:
                stop_capture(p)
        if pair == "c":
            lab.ns.run(lab.ns.target, ["iptables", "-w", "5", "-D", "OUTPUT", "-p", "tcp",
                                       "--sport", "80", "-m", "comment", "--comment",
                                       C_RULE_TAG, "-j", "NFQUEUE", "--queue-num", "0"],
                       check=False)
        lab.down()
        lab.cleanup_files()
        if image:
            subprocess.run(["podman", "image", "unmount", image], capture_output=True)
    secs = r.seconds or 1.0
    return {"offered": requests, "online": online, "target": target,
            "loss_pct": 100.0 * (online - target) / online if online else 100.0,
            "load_s": r.seconds, "achieved_per_s": online / secs,
            "client_errors": r.failed + r.errored, "leaked": leaked, **drops,
            "pool_grew": grew,
            # CPU % while the load ran; µs per request including any catching up after it
            **{f"{d}_cpu_pct": 100.0 * c / secs for d, c in cpu_load.items()},
            **{f"{d}_us_per_req": 1e6 * c / max(1, online) for d, c in cpu.items()},
            "online_side_us_per_req": 1e6 * online_side / max(1, online),
            # what the online host pays: its side, and tcpcopyd unless it runs elsewhere
            "online_host_us_per_req": 1e6 * (online_side + (
                cpu_load["tcpcopyd"] if pair != "mirror" else 0.0)) / max(1, online),
            **delay}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tcpcopyd-bench", description=__doc__)
    ap.add_argument("--rates", default="1000,2000,5000")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--per-connection", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", default="1",
                    help="worker counts per side, e.g. 1,2; auto: tcpcopyd's pool that grows "
                    "and shrinks, with interceptd's default (one)")
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
    ap.add_argument("--pairs", default="ours",
                    help="ours, c (the C tcpcopy + intercept from TCPCOPYD_C_TCPCOPY and "
                    "TCPCOPYD_C_INTERCEPT), compare (ours with --compare), secret (ours with a "
                    "shared secret: both proofs, every batch tagged), pure (ours, the "
                    "pure-Python build: TCPCOPYD_PURE=1), ipv6 (ours, the clients and the "
                    "target over IPv6), mirror (ours --mirror on a mirror host: the online "
                    "host mirrors with tc into VXLAN), none (no copy at all: the online "
                    "side's own cost), image (ours, both daemons from the image "
                    "localhost/tcpcopyd:latest, tools/build-image), comma-separated; they "
                    "alternate run by run")
    ap.add_argument("--compare-c", action="store_true",
                    help="side by side with the C pair: the same as --pairs ours,c --delays")
    ap.add_argument("--delays", action="store_true",
                    help="time each copy from the online to the target interface (tcpdump)")
    ap.add_argument("--plot", metavar="FILE.svg",
                    help="draw CPU per request against rate, and the delays' distribution")
    args = ap.parse_args(argv)
    if args.compare_c:
        args.pairs, args.delays = "ours,c", True
    if os.geteuid() != 0:
        print("the benchmark builds network namespaces: run it as root", file=sys.stderr)
        return 1
    counts: list[int | str] = [x if x == "auto" else int(x) for x in args.workers.split(",")]
    cpus = {k: v for k, v in (("tcpcopyd", args.tcpcopyd_cpus),
                              ("interceptd", args.interceptd_cpus)) if v}
    modes = args.interception.split(",")
    pairs = args.pairs.split(",")
    if not set(modes) <= {"nfqueue", "assistant"}:
        print("--interception: nfqueue, assistant or both", file=sys.stderr)
        return 2
    if not set(pairs) <= set(PAIRS):
        print(f"--pairs: some of {', '.join(PAIRS)}, comma-separated (see --help)",
              file=sys.stderr)
        return 2
    if "c" in pairs and not (os.access(C_TCPCOPY, os.X_OK) and os.access(C_INTERCEPT, os.X_OK)):
        print("--pairs c: set TCPCOPYD_C_TCPCOPY and TCPCOPYD_C_INTERCEPT to the C binaries",
              file=sys.stderr)
        return 2
    # the C pair has one process each, with NFQUEUE
    combos = [(w, m, p) for p in pairs for w in (counts if p != "c" else [1])
              for m in (modes if p != "c" else ["nfqueue"])]
    rows = []
    for rate in [int(x) for x in args.rates.split(",")]:
        # the combinations alternate run by run, so each meets the same machine noise
        runs: dict[tuple, list[dict]] = {c: [] for c in combos}
        for _ in range(args.runs):
            for w, m, p in combos:
                runs[(w, m, p)].append(one_run(
                    rate, args.requests, args.per_connection, w, args.threads,
                    args.nginx_workers, args.settle, cpus, assistant=m == "assistant",
                    pair=p, delays=args.delays))
        for c in combos:
            rows.append((rate, c, summary(runs[c]), runs[c]))
            print(f"rate {rate} {c[2]} workers {c[0]} {c[1]}: " + "; ".join(
                f"loss {r['loss_pct']:.3f}% tcpcopyd {r['tcpcopyd_us_per_req']:.0f} µs "
                f"interceptd {r['interceptd_us_per_req']:.0f} µs" for r in runs[c]),
                flush=True)
    print()
    print(table(rows, args.requests, args.delays))
    if args.plot:
        from tcpcopyd.lab.plot import bench_svg
        with open(args.plot, "w") as f:
            f.write(bench_svg(rows))
        print(f"\nplot: {args.plot}")
    return 0


def summary(runs: list[dict]) -> dict:
    """Medians of the runs; the delays of all runs pooled (their percentiles, ms)."""
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]
           if not k.endswith("_delay")}
    for kind in ("syn", "data"):
        pooled = [d for r in runs for d in r.get(f"{kind}_delay", [])]
        out[f"{kind}_delay"] = pooled
        out[f"{kind}_ms"] = percentiles(pooled)
    return out


def table(rows: list, requests: int, delays: bool) -> str:
    head = ["offered req/s", "achieved req/s", "pair", "workers per side", "interception",
            "requests", "loss % (median)", "worst loss %", "tcpcopyd CPU %", "tcpcopyd µs/req",
            "interceptd CPU %", "interceptd µs/req", "online side µs/req",
            "online host µs/req", "capture drops", "queue drops", "leaked"]
    if delays:
        head += ["SYN delay p50/p90/p99 ms", "data delay p50/p90/p99 ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rate, (workers, mode, pair), m, runs in rows:
        cells = [rate, f"{m['achieved_per_s']:.0f}",
                 PAIR_NAMES.get(pair, "ours"),
                 f"auto (grew {m['pool_grew']:.0f}×)" if workers == "auto" else workers,
                 mode, requests, f"{m['loss_pct']:.3f}",
                 f"{max(r['loss_pct'] for r in runs):.3f}", f"{m['tcpcopyd_cpu_pct']:.0f}",
                 f"{m['tcpcopyd_us_per_req']:.0f}", f"{m['interceptd_cpu_pct']:.0f}",
                 f"{m['interceptd_us_per_req']:.0f}", f"{m['online_side_us_per_req']:.0f}",
                 f"{m['online_host_us_per_req']:.0f}", f"{m['tcpcopyd_kernel_drops']:.0f}",
                 f"{m['interceptd_queue_drops']:.0f}", max(r["leaked"] for r in runs)]
        if delays:
            cells += ["/".join(f"{m[f'{k}_ms'].get(p, float('nan')):.2f}" for p in (50, 90, 99))
                      for k in ("syn", "data")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
