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

The same rules go in ip6tables for IPv6 (``v6=True``: loopback ::1 skipped), on a host
that has IPv6 and ip6tables; interceptd takes IPv6 sessions only once they are in place.
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


def iptables_path(v6: bool = False) -> str:
    name = "ip6tables" if v6 else "iptables"
    path = shutil.which(name)
    if path is None:
        raise RuleError(f"{name} not found: apt install iptables (or run with --no-iptables "
                        "and install the NFQUEUE rules yourself)")
    return path


def has_ipv6() -> bool:
    """Whether this host has IPv6 (the kernel's, enabled)."""
    try:
        with open("/proc/sys/net/ipv6/conf/all/disable_ipv6") as f:
            return f.read().strip() == "0"
    except OSError:
        return False


def guard_tag(instance: str) -> str:
    return GUARD_PREFIX + instance


def _match(port: int, tag: str, v6: bool = False) -> list[str]:
    """What every rule of ours matches: the target's replies from ``port`` to anyone but
    itself."""
    return ["-p", "tcp", "--sport", str(port), "!", "-d", "::1/128" if v6 else "127.0.0.0/8",
            "-m", "comment", "--comment", tag]


def guard_specs(ports: list[int], tag: str, v6: bool = False) -> list[list[str]]:
    return [[*_match(p, tag, v6), "-j", "DROP"] for p in ports]


def rule_specs(ports: list[int], first_queue: int, queues: int, tag: str,
               v6: bool = False) -> list[list[str]]:
    """The rules for ``ports``. With several queues, a reply goes to the queue chosen by
    bits 1.. of its destination (the client's) port, so every reply of one session goes to
    one queue, in order. (--queue-balance hashes the addresses only: one busy client would
    use a single queue; --queue-cpu-fanout follows the CPU, and scatters a session's
    replies over queues, out of order.) Linux clients use even ports, so bit 0 is skipped.
    The target's own IPv6 replies carry no extension header: their TCP header is at 40.
    """
    if queues == 1:
        return [[*_match(p, tag, v6), "-j", "NFQUEUE", "--queue-num", str(first_queue)]
                for p in ports]
    bits = (queues - 1).bit_length()
    specs = []
    for p in ports:
        for r in range(1 << bits):
            # u32: skip the IP header, take the TCP ports word, >> 1, low bits = r
            tcp = "40" if v6 else "0>>22&0x3C@0"
            match = f"{tcp}>>1&{(1 << bits) - 1:#x}={r}"
            m = _match(p, tag, v6)
            specs.append([*m[:7], "-m", "u32", "--u32", match, *m[7:], "-j", "NFQUEUE",
                          "--queue-num", str(first_queue + r % queues)])
    return specs


def _run(args: list[str], v6: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([iptables_path(v6), "-w", "5", *args], capture_output=True,
                          text=True)


def _name(v6: bool) -> str:
    return "ip6tables" if v6 else "iptables"


def tagged(tag: str, v6: bool = False) -> list[list[str]]:
    """The OUTPUT rules carrying exactly our comment ``tag``, as ``-D``-able specs."""
    out = _run(["-S", "OUTPUT"], v6)
    if out.returncode != 0:
        raise RuleError(f"{_name(v6)} -S OUTPUT failed: {out.stderr.strip()}")
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


def remove_tagged(tag: str, v6: bool = False) -> int:
    """Delete every OUTPUT rule carrying our comment (left by a killed instance)."""
    n = 0
    for spec in tagged(tag, v6):
        if _run(["-D", "OUTPUT", *spec], v6).returncode == 0:
            n += 1
    return n


def _port_of(spec: list[str]) -> int | None:
    try:
        return int(spec[spec.index("--sport") + 1])
    except (ValueError, IndexError):
        return None


def ensure_guard(ports: list[int], instance: str, v6: bool = False) -> None:
    """The guard of ``instance`` covers exactly ``ports``: missing rules are inserted first
    (at the top: no ACCEPT of the operator's can come before it), then those of ports no
    longer served are removed (said in the log)."""
    tag = guard_tag(instance)
    present = {_port_of(spec): spec for spec in tagged(tag, v6)}
    for spec in guard_specs(ports, tag, v6):
        if _port_of(spec) in present:
            continue
        r = _run(["-I", "OUTPUT", *spec], v6)
        if r.returncode != 0:
            raise RuleError(f"{_name(v6)} -I OUTPUT {' '.join(spec)}: {r.stderr.strip()}")
    for port, spec in present.items():
        if port not in ports:
            _run(["-D", "OUTPUT", *spec], v6)
            log.info("guard of port %s removed: that port is no longer served", port)


def _ports_matched(args: list[str]) -> tuple[int, int] | None:
    """The source ports a rule's ``--sport``/``--sports`` match covers, as one range;
    ``(0, 65535)`` without one; ``None`` for a negated match or a list (not read)."""
    for i, a in enumerate(args[:-1]):
        if a not in ("--sport", "--source-port", "--sports", "--source-ports"):
            continue
        if i and args[i - 1] == "!":
            return None
        text = args[i + 1]
        if "," in text:
            return None
        low, colon, high = text.partition(":")
        try:
            return int(low or 0), (int(high or 65535) if colon else int(low))
        except ValueError:
            return None
    return 0, 65535


def _queues_of(args: list[str]) -> tuple[int, int] | None:
    """The queue numbers an NFQUEUE rule sends to (``--queue-num`` or
    ``--queue-balance``); ``None`` for a rule that bypasses the queue when nobody reads
    it."""
    if "--queue-bypass" in args:
        return None
    for i, a in enumerate(args[:-1]):
        if a == "--queue-num":
            return int(args[i + 1]), int(args[i + 1])
        if a == "--queue-balance":
            low, _, high = args[i + 1].partition(":")
            return int(low), int(high)
    return 0, 0


def unqueued_ports(ports: list[int], first_queue: int, queues: int,
                   v6: bool = False) -> list[int]:
    """The operator manages the rules (``--no-iptables``): the ports of ``ports`` for which
    no rule reached from OUTPUT (tables raw, mangle, filter; chains OUTPUT jumps to count)
    sends TCP replies to one of our queues without ``--queue-bypass``. A port listed here
    has its replies go to the clients, unless rules outside iptables (native nftables)
    queue them."""
    wanted = range(first_queue, first_queue + queues)
    covered: list[tuple[int, int]] = []
    for table in ("raw", "mangle", "filter"):
        out = _run(["-t", table, "-S"], v6)
        if out.returncode != 0:
            continue
        for args in _queue_rules(out.stdout):
            try:
                target = _queues_of(args)
            except (ValueError, IndexError):
                continue
            span = _ports_matched(args)
            if target and span and target[0] in wanted and target[1] in wanted:
                covered.append(span)
    return [p for p in ports if not any(low <= p <= high for low, high in covered)]


def _queue_rules(listing: str) -> list[list[str]]:
    """The TCP NFQUEUE rules of a table (``iptables -S``) that OUTPUT reaches, itself or
    through the chains it jumps to."""
    chains: dict[str, list[list[str]]] = {}
    for line in listing.splitlines():
        args = [a.strip('"') for a in line.split()]
        if args[:1] == ["-A"] and len(args) > 2:
            chains.setdefault(args[1], []).append(args[2:])
    found, seen, todo = [], set(), ["OUTPUT"]
    while todo:
        chain = todo.pop()
        if chain in seen:
            continue
        seen.add(chain)
        for args in chains.get(chain, []):
            jump = args[args.index("-j") + 1] if "-j" in args[:-1] else ""
            if jump in chains:
                todo.append(jump)
            elif jump == "NFQUEUE" and _tcp(args):
                found.append(args)
    return found


def _tcp(args: list[str]) -> bool:
    """Whether a rule's protocol match takes TCP."""
    if "-p" not in args[:-1]:
        return True
    i = args.index("-p")
    return (i == 0 or args[i - 1] != "!") and args[i + 1] in ("tcp", "6", "all")


def release_guard(instance: str) -> int:
    """The operator's action: remove the guard of ``instance`` (IPv4 and, where it is
    installed, IPv6); returns the rules removed."""
    n = remove_tagged(guard_tag(instance))
    if shutil.which("ip6tables") is not None and has_ipv6():
        n += remove_tagged(guard_tag(instance), v6=True)
    return n


def install(ports: list[int], first_queue: int, queues: int, tag: str,
            instance: str | None = None, v6: bool = False) -> list[list[str]]:
    """Install the guard of ``instance`` (if given), then the queue rules above it; on any
    failure remove the queue rules installed and raise (the guard stays)."""
    if instance is not None:
        ensure_guard(ports, instance, v6)
    stale = remove_tagged(tag, v6)
    if stale:
        log.info("removed %d stale rule(s) tagged %s%s", stale, tag,
                 " (ip6tables)" if v6 else "")
    done: list[list[str]] = []
    for spec in rule_specs(ports, first_queue, queues, tag, v6):
        r = _run(["-I", "OUTPUT", *spec], v6)
        if r.returncode != 0:
            remove(done, v6)
            msg = r.stderr.strip()
            if "NFQUEUE" in msg or "No chain/target/match" in msg or "extension" in msg:
                msg += " (the kernel lacks NFQUEUE: modprobe nfnetlink_queue xt_NFQUEUE)"
            raise RuleError(f"{_name(v6)} -I OUTPUT {' '.join(spec)}: {msg}")
        done.append(spec)
    return done


def remove(specs: list[list[str]], v6: bool = False) -> None:
    for spec in specs:
        r = _run(["-D", "OUTPUT", *spec], v6)
        if r.returncode != 0:
            log.warning("could not remove %s rule %s: %s", _name(v6), " ".join(spec),
                        r.stderr.strip())
