"""Real load from the client namespace: h2load for HTTP, a small memcached text-protocol
client, a keep-alive client that can pause mid-connection."""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from tcpcopyd.lab.net import ONLINE_IP


@dataclass
class LoadResult:
    requests: int
    succeeded: int
    failed: int
    errored: int
    status_2xx: int
    seconds: float
    output: str


def h2load(lab, *, requests: int, rate: int, per_connection: int = 1, path: str = "/",
           threads: int = 1, timeout: float = 600) -> LoadResult:
    """HTTP/1.1 load at ``rate`` requests/s: ``per_connection`` requests on each connection
    (1 = short connections), new connections opened at rate/per_connection per second."""
    conns = max(1, requests // per_connection)
    # new connections every 10 ms, so the load is smooth rather than a burst each second
    conn_rate = max(1, rate // per_connection // 100)
    args = ["h2load", "--h1", "-n", str(conns * per_connection), "-c", str(conns),
            "-r", str(conn_rate), "--rate-period", "10ms", "-t", str(threads),
            "-T", "30", f"http://{ONLINE_IP}{path}"]
    if per_connection == 1:
        args[1:1] = ["-H", "Connection: close"]
    r = lab.ns.run(lab.ns.client, args, check=False, timeout=timeout)
    return parse_h2load(r.stdout + r.stderr)


def parse_h2load(out: str) -> LoadResult:
    m = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored", out)
    s = re.search(r"status codes: (\d+) 2xx", out)
    t = re.search(r"finished in ([\d.]+)(ms|s)", out)
    if not m:
        raise RuntimeError(f"h2load output not understood:\n{out}")
    secs = 0.0
    if t:
        secs = float(t.group(1)) / (1000 if t.group(2) == "ms" else 1)
    return LoadResult(int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4)),
                      int(s.group(1)) if s else 0, secs, out)


MEMCACHED_SETS = r'''
import socket, sys
host, port, n, prefix = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.create_connection((host, port))
f = s.makefile("rb")
bad = 0
for i in range(n):
    v = f"{prefix}-value-{i}-" + "x" * (i % 50)
    s.sendall(f"set {prefix}:{i} 0 0 {len(v)}\r\n{v}\r\n".encode())
    if f.readline() != b"STORED\r\n":
        bad += 1
s.close()
print(f"sets={n} failed={bad}")
'''

MEMCACHED_GET = r'''
import socket, sys
host, port, n, prefix = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.create_connection((host, port))
f = s.makefile("rb")
ok = wrong = missing = 0
for start in range(0, n, 100):
    keys = [f"{prefix}:{i}" for i in range(start, min(n, start + 100))]
    s.sendall(("get " + " ".join(keys) + "\r\n").encode())
    got = {}
    while True:
        line = f.readline()
        if line == b"END\r\n":
            break
        _, key, _, size = line.split()
        got[key.decode()] = f.read(int(size) + 2)[:-2].decode()
    for i, k in zip(range(start, start + len(keys)), keys):
        want = f"{prefix}-value-{i}-" + "x" * (i % 50)
        if k not in got:
            missing += 1
        elif got[k] != want:
            wrong += 1
        else:
            ok += 1
print(f"ok={ok} wrong={wrong} missing={missing}")
'''


def python_in(lab, ns: str, script: str, *args: str, timeout: float = 300
              ) -> subprocess.CompletedProcess:
    import sys
    return lab.ns.run(ns, [sys.executable, "-c", script, *map(str, args)], check=False,
                      timeout=timeout)


def kv(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}
