"""The README's demo: build the lab, replicate real load, print a replication report.

    client 198.18.1.1 --> online 198.18.1.2 (nginx, memcached, tcpcopyd)
                                   |  copies (raw socket)      ^ reply headers (TCP 36524)
                                   v                           |
                          target 198.18.2.2 (nginx, memcached, interceptd)

The lab is dual-stack (client fd18:1::1, online fd18:1::2, target fd18:2::2): tcpcopyd
copies both families, and one workload runs over IPv6.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from tcpcopyd.lab import load
from tcpcopyd.lab.lab import MEMCACHED_PORT, Lab, wait_for
from tcpcopyd.lab.net import CLIENT6_IP, CLIENT_IP, ONLINE6_IP, ONLINE_IP, TARGET6_IP, TARGET_IP


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tcpcopyd-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10000, help="short HTTP requests")
    ap.add_argument("--rate", type=int, default=1000, help="requests per second")
    ap.add_argument("--keepalive-requests", type=int, default=5000)
    ap.add_argument("--ipv6-requests", type=int, default=2000,
                    help="short HTTP requests over IPv6")
    ap.add_argument("--memcached-sets", type=int, default=2000)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo builds network namespaces: run it as root", file=sys.stderr)
        return 1
    lab = Lab(f"demo{os.getpid() % 1000}")
    rows = []
    try:
        print(f"lab: client {CLIENT_IP} -> online {ONLINE_IP} (nginx :80, memcached :11211, "
              f"tcpcopyd) => target {TARGET_IP} (nginx, memcached, interceptd); over IPv6 "
              f"{CLIENT6_IP} -> {ONLINE6_IP} => {TARGET6_IP}")
        lab.up()
        lab.start_interceptd()
        lab.start_tcpcopyd(ipv6=True)
        cpu0 = {d: lab.daemon_cpu_seconds(d) for d in ("tcpcopyd", "interceptd")}

        def http_row(title: str, requests: int, per_conn: int, host: str = ONLINE_IP) -> None:
            before_on, before_tg = len(lab.nginx_log("online")), len(lab.nginx_log("target"))
            print(f"running: {title} ...", flush=True)
            r = load.h2load(lab, requests=requests, rate=args.rate, per_connection=per_conn,
                            host=host)
            online = len(lab.nginx_log("online")) - before_on
            wait_for(lambda: len(lab.nginx_log("target")) - before_tg >= online, 30,
                     "the target to catch up") if online else None
            target = [f for f in lab.nginx_log("target")[before_tg:] if f[2] == "200"]
            rows.append((title, online, len(target), r.failed + r.errored))

        http_row(f"HTTP short connections, {args.requests} at {args.rate}/s", args.requests, 1)
        http_row(f"HTTP keep-alive, 10 per connection, {args.keepalive_requests}",
                 args.keepalive_requests, 10)
        http_row(f"HTTP over IPv6, {args.ipv6_requests} at {args.rate}/s",
                 args.ipv6_requests, 1, f"[{ONLINE6_IP}]")
        print("running: memcached sets ...", flush=True)
        n = args.memcached_sets
        out = load.kv(load.python_in(lab, lab.ns.client, load.MEMCACHED_SETS, ONLINE_IP,
                                     MEMCACHED_PORT, n, "demo").stdout)
        got = {}

        def target_keys() -> bool:
            got.update(load.kv(load.python_in(lab, lab.ns.target, load.MEMCACHED_GET,
                                              "127.0.0.1", MEMCACHED_PORT, n, "demo").stdout))
            return got.get("ok") == n
        try:
            wait_for(target_keys, 30, "the target's memcached", interval=1.0)
        except Exception:
            pass
        rows.append((f"memcached set, {n} on one connection", n - out.get("failed", n),
                     got.get("ok", 0), out.get("failed", 0)))
        time.sleep(0.2)
        cpu = {d: lab.daemon_cpu_seconds(d) - cpu0[d] for d in cpu0}
        leaked = lab.ns.leaked()
    finally:
        lab.down()
        lab.cleanup_files()
    total = sum(r[1] for r in rows)
    print()
    print("replication report")
    print(f"  {'workload':<46} {'online':>8} {'target':>8} {'lost':>8} {'client errors':>14}")
    for title, online, target, errors in rows:
        lost = 100.0 * (online - target) / online if online else 0.0
        print(f"  {title:<46} {online:>8} {target:>8} {lost:>7.2f}% {errors:>14}")
    for d, secs in cpu.items():
        print(f"  CPU of {d:<11} {secs:6.2f} s  = {1e6 * secs / max(1, total):6.0f} µs per "
              "replicated request")
    print(f"  target packets that reached the client / online host: "
          f"{leaked[lab.ns.client]} / {leaked[lab.ns.online]}")
    ok = all(r[1] == r[2] for r in rows) and not any(leaked.values())
    print("  result:", "every request replicated, nothing leaked" if ok else "LOSS OR LEAK")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
