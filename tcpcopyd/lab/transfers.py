"""Long-transfer benchmark: uploads through the online nginx, copied packets dropped at
random on the target; reports how many bodies reached the target byte-exact and how long
the copies took (from the first upload to the last body logged by the target)."""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

from shm import segment as shmseg
from tcpcopyd.health import status
from tcpcopyd.lab.lab import Lab, wait_for
from tcpcopyd.lab.net import CLIENT6_NET, CLIENT_NET, ONLINE6_IP, ONLINE_IP


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run(size_mib: int, count: int, drop: float, ipv6: bool = False) -> dict:
    """``ipv6``: the client uploads over IPv6 (the copies and their loss too)."""
    lab = Lab(f"xfer{os.getpid() % 1000}")
    try:
        lab.up(memcached=False)
        lab.start_interceptd([80])
        lab.start_tcpcopyd([80], extra=["--session-buffer", str(max(64, 3 * size_mib) << 20)],
                           ipv6=ipv6)
        tables, net, host = ("ip6tables", CLIENT6_NET, f"[{ONLINE6_IP}]") if ipv6 \
            else ("iptables", CLIENT_NET, ONLINE_IP)
        if drop:
            lab.ns.run(lab.ns.target, [tables, "-w", "5", "-t", "raw", "-I", "PREROUTING",
                                       "-s", net, "-p", "tcp", "-m", "statistic",
                                       "--mode", "random", "--probability", str(drop), "-j",
                                       "DROP"])
        body = os.path.join(lab.dir, "body")
        with open(body, "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(1 << 20))
        want = sha256(body)
        t0 = time.monotonic()
        ok_online = 0
        for i in range(count):
            r = lab.ns.run(lab.ns.client, ["curl", "-sS", "-o", "/dev/null", "-w",
                                           "%{http_code}", "--data-binary", f"@{body}", "-H",
                                           "Expect:", f"http://{host}/upload?{i}"],
                           timeout=600)
            ok_online += r.stdout == "200"
        try:
            wait_for(lambda: len(lab.nginx_log("target")) >= count, 300, "target")
        except Exception:
            pass
        took = time.monotonic() - t0
        exact = sum(1 for f in lab.nginx_log("target")
                    if f[2] == "200" and f[7] != "-" and sha256(f[7]) == want)
        seg = shmseg.attach(f"{lab.ns.prefix}-tcpcopyd")
        totals = status.totals(seg)
        seg.close()
    finally:
        lab.down()
        lab.cleanup_files()
    return {"size_mib": size_mib, "count": count, "drop": drop, "online_200": ok_online,
            "exact": exact, "seconds": took,
            "timeouts": totals.get("retransmits", 0),
            "retransmits": totals.get("retransmits", 0) + totals.get("fast_retransmits", 0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tcpcopyd-transfers", description=__doc__)
    ap.add_argument("--cases", default="10x10@0,10x10@0.001,10x10@0.01,100x1@0.001",
                    help="SIZE_MiBxCOUNT@DROP,...")
    ap.add_argument("--ipv6", action="store_true", help="the uploads over IPv6")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("run it as root (it builds network namespaces)", file=sys.stderr)
        return 1
    print("| uploads | drop toward target | client 200 | byte-exact on target | "
          "time (s) | retransmissions (of which timeouts) |")
    print("|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        sizes, drop = case.split("@")
        size, count = (int(x) for x in sizes.split("x"))
        r = run(size, count, float(drop), args.ipv6)
        print(f"| {count} × {size} MiB | {100 * r['drop']:g} % | {r['online_200']}/{count} | "
              f"{r['exact']}/{count} | {r['seconds']:.1f} | {r['retransmits']} "
              f"({r['timeouts']}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
