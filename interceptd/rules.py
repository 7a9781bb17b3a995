"""iptables rules that hand the target's replies to interceptd, and the guard that drops
them while no interceptd runs.

Rules go in the OUTPUT chain (the target's own replies), match the service ports and skip
loopback destinations (never replicated traffic), and carry a comment so exactly our rules
are found:

- the **queue rules** (``interceptd:NAME``) send each reply to a worker's NFQUEUE; they are
  installed at start and removed at stop. They never use --queue-bypass: with nobody
  reading a queue, the kernel drops what it holds.
- the **guard** (``interceptd-guard:NAME``), one DROP rule per service port, sits under
  the queue rules. interceptd installs it before its first queue rule and never removes
  it: a stop, a restart, an upgrade, a crash or SIGKILL leave it in place, so between two
  interceptds the target's replies are dropped by the kernel, not routed to the clients.
  Only the operator lifts it (``tcpcopyctl release-guard NAME``, or removing the package).
"""
from __future__ import annotations

import logging
import shutil
import subprocess

log = logging.getLogger("interceptd.rules")

# the comment of an instance's guard rules, before its name
GUARD_PREFIX = "interceptd-guard:"


class RuleError(RuntimeError):
    """iptables is missing or refused a rule."""


def iptables_path() -> str:
    path = shutil.which("iptables")
    if path is None:
        raise RuleError("iptables not found: apt install iptables (or run with --no-iptables "
                        "and install the NFQUEUE rules yourself)")
    return path


def guard_tag(instance: str) -> str:
    return GUARD_PREFIX + instance


def _match(port: int, tag: str) -> list[str]:
    """What every rule of ours matches: the target's replies from ``port`` to anyone but
    itself."""
    return ["-p", "tcp", "--sport", str(port), "!", "-d", "127.0.0.0/8", "-m", "comment",
            "--comment", tag]


def guard_specs(ports: list[int], tag: str) -> list[list[str]]:
    return [[*_match(p, tag), "-j", "DROP"] for p in ports]


def rule_specs(ports: list[int], first_queue: int, queues: int, tag: str) -> list[list[str]]:
    """The rules for ``ports``. With several queues, a reply goes to the queue chosen by
    bits 1.. of its destination (the client's) port, so every reply of one session goes to
    one queue, in order. (--queue-balance hashes the addresses only: one busy client would
    use a single queue; --queue-cpu-fanout follows the CPU, and scatters a session's
    replies over queues, out of order.) Linux clients use even ports, so bit 0 is skipped.
    """
    if queues == 1:
        return [[*_match(p, tag), "-j", "NFQUEUE", "--queue-num", str(first_queue)]
                for p in ports]
    bits = (queues - 1).bit_length()
    specs = []
    for p in ports:
        for r in range(1 << bits):
            # u32: skip the IP header, take the TCP ports word, >> 1, low bits = r
            match = f"0>>22&0x3C@0>>1&{(1 << bits) - 1:#x}={r}"
            m = _match(p, tag)
            specs.append([*m[:7], "-m", "u32", "--u32", match, *m[7:], "-j", "NFQUEUE",
                          "--queue-num", str(first_queue + r % queues)])
    return specs


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([iptables_path(), "-w", "5", *args], capture_output=True, text=True)


def tagged(tag: str) -> list[list[str]]:
    """The OUTPUT rules carrying exactly our comment ``tag``, as ``-D``-able specs."""
    out = _run(["-S", "OUTPUT"])
    if out.returncode != 0:
        raise RuleError(f"iptables -S OUTPUT failed: {out.stderr.strip()}")
    found = []
    for line in out.stdout.splitlines():
        args = [a.strip('"') for a in line.split()]
        if args[:2] != ["-A", "OUTPUT"]:
            continue
        for i, a in enumerate(args[:-1]):
            if a == "--comment" and args[i + 1] == tag:
                found.append(args[2:])
                break
    return found


def remove_tagged(tag: str) -> int:
    """Delete every OUTPUT rule carrying our comment (left by a killed instance)."""
    n = 0
    for spec in tagged(tag):
        if _run(["-D", "OUTPUT", *spec]).returncode == 0:
            n += 1
    return n


def _port_of(spec: list[str]) -> int | None:
    try:
        return int(spec[spec.index("--sport") + 1])
    except (ValueError, IndexError):
        return None


def ensure_guard(ports: list[int], instance: str) -> None:
    """The guard of ``instance`` covers exactly ``ports``: missing rules are inserted first
    (at the top: no ACCEPT of the operator's can come before it), then those of ports no
    longer served are removed (said in the log)."""
    tag = guard_tag(instance)
    present = {_port_of(spec): spec for spec in tagged(tag)}
    for spec in guard_specs(ports, tag):
        if _port_of(spec) in present:
            continue
        r = _run(["-I", "OUTPUT", *spec])
        if r.returncode != 0:
            raise RuleError(f"iptables -I OUTPUT {' '.join(spec)}: {r.stderr.strip()}")
    for port, spec in present.items():
        if port not in ports:
            _run(["-D", "OUTPUT", *spec])
            log.info("guard of port %s removed: that port is no longer served", port)


def release_guard(instance: str) -> int:
    """The operator's action: remove the guard of ``instance``; returns the rules removed."""
    return remove_tagged(guard_tag(instance))


def install(ports: list[int], first_queue: int, queues: int, tag: str,
            instance: str | None = None) -> list[list[str]]:
    """Install the guard of ``instance`` (if given), then the queue rules above it; on any
    failure remove the queue rules installed and raise (the guard stays)."""
    if instance is not None:
        ensure_guard(ports, instance)
    stale = remove_tagged(tag)
    if stale:
        log.info("removed %d stale rule(s) tagged %s", stale, tag)
    done: list[list[str]] = []
    for spec in rule_specs(ports, first_queue, queues, tag):
        r = _run(["-I", "OUTPUT", *spec])
        if r.returncode != 0:
            remove(done)
            msg = r.stderr.strip()
            if "NFQUEUE" in msg or "No chain/target/match" in msg or "extension" in msg:
                msg += " (the kernel lacks NFQUEUE: modprobe nfnetlink_queue xt_NFQUEUE)"
            raise RuleError(f"iptables -I OUTPUT {' '.join(spec)}: {msg}")
        done.append(spec)
    return done


def remove(specs: list[list[str]]) -> None:
    for spec in specs:
        r = _run(["-D", "OUTPUT", *spec])
        if r.returncode != 0:
            log.warning("could not remove rule %s: %s", " ".join(spec), r.stderr.strip())
