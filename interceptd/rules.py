"""iptables NFQUEUE rules that hand the target's replies to interceptd.

Rules go in the OUTPUT chain (the target's own replies), match the service ports and skip
loopback destinations (never replicated traffic), carry the comment ``interceptd:NAME`` so
exactly our rules are found and removed, and never use --queue-bypass: with nobody reading
the queue the kernel drops the replies (fail-closed).
"""
from __future__ import annotations

import logging
import shutil
import subprocess

log = logging.getLogger("interceptd.rules")


class RuleError(RuntimeError):
    """iptables is missing or refused a rule."""


def iptables_path() -> str:
    path = shutil.which("iptables")
    if path is None:
        raise RuleError("iptables not found: apt install iptables (or run with --no-iptables "
                        "and install the NFQUEUE rules yourself)")
    return path


def rule_specs(ports: list[int], first_queue: int, queues: int, tag: str) -> list[list[str]]:
    """The rules for ``ports``. With several queues, a reply goes to the queue chosen by
    bits 1.. of its destination (the client's) port, so every reply of one session goes to
    one queue, in order. (--queue-balance hashes the addresses only: one busy client would
    use a single queue; --queue-cpu-fanout follows the CPU, and scatters a session's
    replies over queues, out of order.) Linux clients use even ports, so bit 0 is skipped.
    """
    base = ["!", "-d", "127.0.0.0/8", "-m", "comment", "--comment", tag]
    if queues == 1:
        return [["-p", "tcp", "--sport", str(p), *base, "-j", "NFQUEUE", "--queue-num",
                 str(first_queue)] for p in ports]
    bits = (queues - 1).bit_length()
    specs = []
    for p in ports:
        for r in range(1 << bits):
            # u32: skip the IP header, take the TCP ports word, >> 1, low bits = r
            match = f"0>>22&0x3C@0>>1&{(1 << bits) - 1:#x}={r}"
            specs.append(["-p", "tcp", "--sport", str(p), "-m", "u32", "--u32", match, *base,
                          "-j", "NFQUEUE", "--queue-num", str(first_queue + r % queues)])
    return specs


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([iptables_path(), "-w", "5", *args], capture_output=True, text=True)


def remove_tagged(tag: str) -> int:
    """Delete every OUTPUT rule carrying our comment (left by a killed instance)."""
    out = _run(["-S", "OUTPUT"])
    if out.returncode != 0:
        raise RuleError(f"iptables -S OUTPUT failed: {out.stderr.strip()}")
    n = 0
    for line in out.stdout.splitlines():
        if f'--comment {tag} ' in line + " " or f'--comment "{tag}"' in line:
            args = line.split()
            if args[:1] == ["-A"]:
                args[0] = "-D"
                args = [a.strip('"') for a in args]
                if _run(args).returncode == 0:
                    n += 1
    return n


def install(ports: list[int], first_queue: int, queues: int, tag: str) -> list[list[str]]:
    """Install the rules; on any failure remove what was installed and raise."""
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
