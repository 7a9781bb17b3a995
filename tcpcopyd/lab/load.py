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
           threads: int = 1, timeout: float = 600, ns: str | None = None,
           host: str = ONLINE_IP) -> LoadResult:
    """HTTP/1.1 load at ``rate`` requests/s: ``per_connection`` requests on each connection
    (1 = short connections), new connections opened at rate/per_connection per second."""
    conns = max(1, requests // per_connection)
    # new connections every 10 ms, so the load is smooth rather than a burst each second
    # (-r is the total over all threads)
    conn_rate = max(1, rate // per_connection // 100)
    args = ["h2load", "--h1", "-n", str(conns * per_connection), "-c", str(conns),
            "-r", str(conn_rate), "--rate-period", "10ms", "-t", str(threads),
            "-T", "30", f"http://{host}{path}"]
    if per_connection == 1:
        args[1:1] = ["-H", "Connection: close"]
    r = lab.ns.run(ns or lab.ns.client, args, check=False, timeout=timeout)
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


# Keep-alive HTTP clients that each send one request every `interval` seconds: a steady
# request rate over long-lived connections (h2load sends a connection's requests back to
# back). Prints ok=, errors=.
PACED_KEEPALIVE = r'''
import asyncio, sys, time
host, conns, per_conn, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
interval = conns / rate
ok = errors = 0
async def client(i):
    global ok, errors
    await asyncio.sleep(interval * i / conns)
    try:
        r, w = await asyncio.open_connection(host, 80)
    except OSError:
        errors += per_conn
        return
    start = time.monotonic()
    for n in range(per_conn):
        try:
            w.write(f"GET /?c={i}&n={n} HTTP/1.1\r\nHost: lab\r\n\r\n".encode())
            head = await r.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await r.readexactly(length)
            ok += head.startswith(b"HTTP/1.1 200")
            errors += not head.startswith(b"HTTP/1.1 200")
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            errors += per_conn - n
            return
        delay = start + (n + 1) * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    w.close()
async def main():
    await asyncio.gather(*(client(i) for i in range(conns)))
asyncio.run(main())
print(f"ok={ok} errors={errors}")
'''


def paced_keepalive(lab, *, connections: int, per_connection: int, rate: int,
                    host: str = ONLINE_IP):
    """Start the paced keep-alive load in the client namespace (a Popen; read its stdout)."""
    import sys
    return subprocess.Popen(["ip", "netns", "exec", lab.ns.client, sys.executable, "-c",
                             PACED_KEEPALIVE, host, str(connections), str(per_connection),
                             str(rate)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


# Keep-alive HTTP clients that hold their connections open, each sending a request every
# `interval` seconds, until SIGUSR1: then each sends one last request, /?final=I, and
# closes. Prints ok=, errors=, final=.
LONG_KEEPALIVE = r'''
import asyncio, signal, sys
host, conns, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ok = errors = final = 0
async def ask(r, w, path):
    w.write(f"GET {path} HTTP/1.1\r\nHost: lab\r\n\r\n".encode())
    head = await r.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    await r.readexactly(length)
    return head.startswith(b"HTTP/1.1 200")
async def client(i, done):
    global ok, errors, final
    await asyncio.sleep(interval * i / conns)
    try:
        r, w = await asyncio.open_connection(host, 80)
        n = 0
        while not done.is_set():
            good = await ask(r, w, f"/?long={i}&n={n}")
            ok, errors, n = ok + good, errors + (not good), n + 1
            try:
                await asyncio.wait_for(done.wait(), interval)
            except asyncio.TimeoutError:
                pass
        good = await ask(r, w, f"/?final={i}")
        final += good
        w.close()
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        errors += 1
async def main():
    done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, done.set)
    await asyncio.gather(*(client(i, done) for i in range(conns)))
asyncio.run(main())
print(f"ok={ok} errors={errors} final={final}")
'''


def long_keepalive(lab, *, connections: int, interval: float):
    """Start the long-lived keep-alive clients (a Popen): SIGUSR1 makes each send its last
    request, /?final=I, and exit; then read ok=, errors=, final= from its stdout."""
    import sys
    return subprocess.Popen(["ip", "netns", "exec", lab.ns.client, sys.executable, "-c",
                             LONG_KEEPALIVE, ONLINE_IP, str(connections), str(interval)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
