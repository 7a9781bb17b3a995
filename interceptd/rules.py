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
    if queues > 1:
        # --queue-cpu-fanout: the reply goes to the queue of the CPU that produced it (the
        # plain balance hashes addresses only, so one busy client would use a single queue)
        target = ["-j", "NFQUEUE", "--queue-balance", f"{first_queue}:{first_queue + queues - 1}",
                  "--queue-cpu-fanout"]
    else:
        target = ["-j", "NFQUEUE", "--queue-num", str(first_queue)]
    return [["-p", "tcp", "--sport", str(p), "!", "-d", "127.0.0.0/8",
             "-m", "comment", "--comment", tag, *target] for p in ports]


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
