"""`tcpcopyctl doctor`: checks the set-up of either host and says, for each thing that is
wrong, how to fix it. Most reports of "the SYN reaches the target but the handshake never
completes" are one of these: no return route, strict rp_filter, no NFQUEUE rule or no
reader behind it, an unreachable control port, or two releases of another protocol.

    tcpcopyctl doctor tcpcopyd [tcpcopyd's flags or --config FILE -i IFACE]
    tcpcopyctl doctor --client ADDR[,ADDR] interceptd [interceptd's flags or --config FILE]

Exit code 0 when every check passed (a skipped check does not fail), 1 otherwise.
"""
from __future__ import annotations

import ipaddress
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence

from tcpcopyd.ctl.checks import Check, fail, ok, sysctl
from tcpcopyd.net import auth, netlink, wire
from tcpcopyd.service import capabilities
from tcpcopyd.service.settings import Config, ConfigError, load, load_secret

CONNECT_TIMEOUT = 3.0
# how long a peer has to refuse our version message by closing the connection
VERSION_WAIT = 1.0
NFQUEUE_PROC = "/proc/net/netfilter/nfnetlink_queue"


def interfaces_up() -> list[str]:
    return sorted(lk.name for lk in netlink.links() if lk.admin_up and lk.name != "lo")


def gro(iface: str) -> str:
    on = netlink.gro(iface)
    return "GRO unknown" if on is None else f"GRO {'on' if on else 'off'}"


def iptables_output_rules(tables: str = "iptables") -> list[str] | None:
    """The OUTPUT chain of ``tables`` (iptables or ip6tables); None if it cannot be read."""
    if not shutil.which(tables):
        return None
    r = subprocess.run([tables, "-w", "5", "-S", "OUTPUT"], capture_output=True,
                       text=True, timeout=20)
    return r.stdout.splitlines() if r.returncode == 0 else None


def has_ipv6() -> bool:
    return sysctl("net/ipv6/conf/all/disable_ipv6") == "0"


def bound_queues() -> set[int] | None:
    """NFQUEUE numbers some process reads in this network namespace."""
    try:
        with open(NFQUEUE_PROC) as f:
            return {int(line.split()[0]) for line in f if line.strip()}
    except FileNotFoundError:
        return set()   # the module is not loaded: nobody reads any queue
    except OSError:
        return None


def version_probe(host: str, port: int, secret: bytes | None = None) -> tuple[str, str]:
    """("unreachable"|"refused"|"unwelcome"|"accepted", detail): connects, sends our version
    message and our offer of extensions (with the proof of ``secret`` if interceptd asks
    for it), and reads the answer: an interceptd of another protocol version closes the
    connection; ours says why it refuses us; a C intercept says nothing."""
    try:
        s = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError as e:
        return "unreachable", e.strerror or str(e)
    with s:
        ours = s.getsockname()[0]
        try:
            client_nonce = auth.nonce()
            offered = wire.FEATURE_AUTH if secret else 0
            s.sendall(wire.version_message() + wire.hello_message(offered)
                      + (wire.challenge_messages(client_nonce) if secret else b""))
            answer = _read_answer(s)
            if answer is not None and answer.kind == wire.EXT_WELCOME:
                if secret is None and answer.features & wire.FEATURE_AUTH:
                    return "unwelcome", (f"interceptd at {host}:{port} wants the shared "
                                         f"secret and we have none "
                                         f"({wire.REFUSAL_FIX[wire.SECRET_WANTED]})")
                if secret is not None:
                    return _prove(s, f"{host}:{port}", secret, client_nonce, answer)
        except TimeoutError:
            if secret is not None:
                return "unwelcome", (f"interceptd at {host}:{port} did not answer our offer "
                                     f"(a C intercept?): it cannot prove the shared secret, "
                                     f"and tcpcopyd with a secret will not use it")
            return "accepted", f"protocol version {wire.VERSION} (no extensions)"
        except OSError as e:
            return "refused", e.strerror or str(e)
        if answer is None:
            return "refused", "closed the connection after our version message"
        if answer.kind == wire.EXT_REFUSED:
            return "unwelcome", (f"interceptd at {host}:{port} refused us, {ours}: "
                                 f"{wire.refusal_reason(answer)}")
        return "accepted", f"protocol version {wire.VERSION}"


def _prove(s: socket.socket, where: str, secret: bytes, client_nonce: bytes, answer: tuple
           ) -> tuple[str, str]:
    """The rest of the handshake with a secret: interceptd's proof checked, ours sent, and
    interceptd's verdict on it (it says nothing when it took it)."""
    if not answer.features & wire.FEATURE_AUTH:
        return "unwelcome", (f"interceptd at {where} has no shared secret (give it the same "
                             f"secret_file; tcpcopyd with a secret will not use it)")
    server_nonce, proof = wire.welcome_proof(answer)
    seen = auth.transcript(client_nonce, server_nonce, wire.FEATURE_AUTH, answer.features)
    if not auth.same(proof, auth.server_proof(secret, seen)):
        return "unwelcome", (f"interceptd at {where} gave a wrong proof of the shared secret "
                             f"(give both hosts the same secret_file)")
    s.sendall(wire.proof_messages(auth.client_proof(secret, seen)))
    try:
        refusal = _read_answer(s)
    except TimeoutError:
        return "accepted", f"protocol version {wire.VERSION}, shared secret proved both ways"
    if refusal is not None and refusal.kind == wire.EXT_REFUSED:
        return "unwelcome", f"interceptd at {where} refused us: {wire.refusal_reason(refusal)}"
    return "refused", "closed the connection after our proof"


def _read_answer(s: socket.socket) -> tuple | None:
    """interceptd's extension frame; None if it closed the connection; TimeoutError if it
    said nothing for VERSION_WAIT (it answered our offer, or takes no extensions)."""
    s.settimeout(VERSION_WAIT)
    data = b""
    while len(data) < 2 + wire.REPLY_SIZE:
        chunk = s.recv(2 + wire.REPLY_SIZE - len(data))
        if not chunk:
            return None
        data += chunk
    if wire.COMBINED_HEAD.unpack_from(data, 0).count != wire.EXT_MARK:
        return None
    return wire.EXT.unpack_from(data, 2)


# ------------------------------------------------------------------ checks
def check_privileges(needed: tuple[str, ...], why: str) -> Check:
    missing = capabilities.missing(needed)
    if missing:
        return fail("privileges", f"missing {', '.join(missing)} ({why})",
                    "run as root (sudo), or as the systemd unit that grants them")
    return ok("privileges", ", ".join(needed))


def check_control(host: str, port: int, where: str, secret: bytes | None = None
                  ) -> Iterator[Check]:
    state, detail = version_probe(host, port, secret)
    if state == "unreachable":
        yield fail("control port", f"{host}:{port}: {detail}",
                   f"start interceptd {where}(systemctl start interceptd), or open tcp port "
                   f"{port} in its firewall")
        yield Check("protocol version", "SKIP", "no connection")
        return
    yield ok("control port", f"{host}:{port} accepts connections")
    if state == "unwelcome":
        # "... (the fix)": the fix goes on its own line
        what, _, fix = detail.rpartition(" (")
        yield fail("protocol version", what, fix.rstrip(")"))
    elif state == "refused":
        yield fail("protocol version", f"interceptd at {host}:{port} {detail}: it speaks "
                   f"another protocol than version {wire.VERSION}",
                   "install the same tcpcopyd release on the online and the target host")
    else:
        yield ok("protocol version", f"interceptd at {host}:{port} takes {detail}")


def online_checks(cfg: Config) -> Iterator[Check]:
    yield check_privileges(("CAP_NET_RAW",), "AF_PACKET capture and raw sockets")
    iface = cfg.interface
    lk = netlink.link(iface)
    if netlink.is_interface_set(iface):
        found = netlink.matching(iface)
        if found:
            yield ok("interface", f"-i {iface} matches {', '.join(sorted(found))} now (and "
                     "each one that appears while tcpcopyd runs)")
        else:
            yield fail("interface", f"-i {iface} matches no interface now: nothing is "
                       "captured until one appears", "check the names and patterns "
                       "(ip -br link)")
    elif lk is None:
        yield fail("interface", f"{iface} does not exist",
                   "name an existing interface (ip -br link): tcpcopyd@IFACE / -i IFACE")
    elif not lk.admin_up:
        yield fail("interface", f"{iface} is down", f"ip link set {iface} up")
    else:
        yield ok("interface", f"{iface} is up" + ("" if lk.up else " (no carrier yet)"))
        yield ok("mtu/gro", f"{iface} mtu {lk.mtu}, -M {cfg.mtu}; {gro(iface)} (frames "
                 "merged by GRO are cut to -M and counted as oversize_frames)")
    if cfg.mirror:
        from tcpcopyd.ctl.mirrorcheck import mirror_checks
        yield from mirror_checks(cfg)
    for t in cfg.transfer:
        if t.online_ip is not None and not cfg.mirror \
                and netlink.interface_of(t.online_ip) is None:
            yield fail("online address", f"{t.online_ip} (of -x {t}) is not an address of "
                       "this host: its traffic never reaches the capture",
                       "name an address of this host (ip -br addr), or leave it out to "
                       "copy the port on every address")
        r = netlink.route_get(t.target_ip)
        if r is None:
            yield fail("target route", f"no route to the target {t.target_ip}",
                       f"ip route add {t.target_ip} via GATEWAY")
        else:
            yield ok("target route", f"{t.target_ip} via {r.gateway or 'direct'} dev "
                     f"{r.dev}")
    for host, port in cfg.server:
        yield from check_control(host, port, f"on {host} ", cfg.secret)


def target_checks(cfg: Config, clients: list[str]) -> Iterator[Check]:
    yield check_privileges(("CAP_NET_ADMIN", "CAP_NET_RAW"), "NFQUEUE and iptables")
    if cfg.interface:
        yield from assistant_checks(cfg)
    else:
        yield from return_route_checks(clients)
        yield from rule_checks(cfg)
    host = "127.0.0.1" if cfg.listen == "0.0.0.0" else cfg.listen
    yield from check_control(host, cfg.port, "", cfg.secret)


def return_route_checks(clients: list[str]) -> Iterator[Check]:
    if not clients:
        yield Check("return route", "SKIP", "give --client ADDR (a client address) to check "
                    "how the replies leave")
        yield Check("rp_filter", "SKIP", "needs --client")
        return
    leave: set[str] = set()
    gateway = netlink.default_gateway()
    for c in clients:
        r = netlink.route_get(c)
        if r is None or not r.unicast:
            yield fail("return route", f"the target has no route to the client {c}: it "
                       "cannot send its SYN-ACK, so no handshake completes",
                       f"ip route add {net24(c)} via DEAD_END, a next hop on the target's "
                       "network that never answers (interceptd takes the replies in OUTPUT "
                       "before they leave)")
            continue
        dev = r.dev
        leave.add(dev)
        via = r.gateway
        note = ""
        if via and via == gateway:
            note = "; it is the default gateway: should interceptd stop, replies reach the " \
                   "real clients (a dead-end next hop is safer)"
        yield ok("return route", f"replies to {c} leave via {via or 'direct'} dev {dev}"
                 f"{note}")
    all_rp = int(sysctl("net/ipv4/conf/all/rp_filter") or 0)
    strict = [i for i in interfaces_up()
              if i not in leave and max(all_rp, int(sysctl(f"net/ipv4/conf/{i}/rp_filter")
                                                    or 0)) == 1]
    if leave and strict:
        names = ", ".join(strict)
        yield fail("rp_filter", f"strict rp_filter on {names}: copies from the clients "
                   f"arriving there are dropped, their return route leaves via "
                   f"{', '.join(sorted(leave))}",
                   "sysctl -w net.ipv4.conf.all.rp_filter=2 "
                   + " ".join(f"net.ipv4.conf.{i}.rp_filter=2" for i in strict)
                   + " (loose mode; 0 also works)")
    elif leave:
        yield ok("rp_filter", f"all={all_rp}; no interface drops copies by strict reverse-"
                 "path filtering")


def assistant_checks(cfg: Config) -> Iterator[Check]:
    """interceptd -i IFACE: replies are captured here, and must end here."""
    lk = netlink.link(cfg.interface)
    if lk is None or not lk.admin_up:
        yield fail("assistant interface", f"{cfg.interface} is missing or down",
                   f"ip link set {cfg.interface} up (or name the interface the target's "
                   "replies arrive on)")
    else:
        yield ok("assistant interface", f"replies captured on {cfg.interface}")
    forwarding = sysctl("net/ipv4/ip_forward")
    forwarding6 = sysctl("net/ipv6/conf/all/forwarding") if has_ipv6() else "0"
    if forwarding == "1":
        yield fail("no forwarding", "this host forwards IPv4: the target's replies would go "
                   "on to the real clients", "sysctl -w net.ipv4.ip_forward=0")
    elif forwarding6 == "1":
        yield fail("no forwarding", "this host forwards IPv6: the target's replies would go "
                   "on to the real clients", "sysctl -w net.ipv6.conf.all.forwarding=0")
    else:
        yield ok("no forwarding", "net.ipv4.ip_forward=0" + (
            ", net.ipv6.conf.all.forwarding=0" if has_ipv6() else "")
            + ": the replies end here")


def rule_checks(cfg: Config) -> Iterator[Check]:
    rules = iptables_output_rules()
    if rules is None:
        yield fail("nfqueue rule", "cannot list the OUTPUT chain (iptables missing?)",
                   "apt install iptables")
        return
    queues: set[int] = set()
    for p in cfg.service_port:
        mine = [r for r in rules if "NFQUEUE" in r and f"--sport {p} " in r + " "]
        if not mine:
            yield fail("nfqueue rule", f"no NFQUEUE rule takes the replies of port {p}: they "
                       "reach the real clients, which reset the sessions",
                       "start interceptd (it installs the rules), or add them: iptables -I "
                       f"OUTPUT -p tcp --sport {p} ! -d 127.0.0.0/8 -j NFQUEUE --queue-num "
                       f"{cfg.queue_num}")
            continue
        for r in mine:
            queues.update(int(q) for q in re.findall(r"--queue-num (\d+)", r))
        yield ok("nfqueue rule", f"port {p}: {len(mine)} rule(s) in OUTPUT")
    yield from ipv6_rule_checks(cfg)
    if not queues:
        return
    bound = bound_queues()
    if bound is None:
        yield Check("nfqueue reader", "SKIP", f"cannot read {NFQUEUE_PROC}")
        return
    idle = sorted(queues - bound)
    if idle:
        yield fail("nfqueue reader", f"nobody reads NFQUEUE {', '.join(map(str, idle))}: the "
                   "kernel drops those replies (fail-closed), no session completes",
                   "start interceptd (systemctl start interceptd)")
    else:
        yield ok("nfqueue reader", f"NFQUEUE {', '.join(map(str, sorted(queues)))} read")


def ipv6_rule_checks(cfg: Config) -> Iterator[Check]:
    """The ip6tables rules interceptd installs beside the iptables ones: without them it
    takes no IPv6 session (tcpcopyd copies only IPv4 here), which is only a choice."""
    if not has_ipv6():
        yield Check("nfqueue rule (IPv6)", "SKIP", "this host has no IPv6: IPv4 only")
        return
    rules = iptables_output_rules("ip6tables")
    missing = [p for p in cfg.service_port
               if rules is None or not any("NFQUEUE" in r and f"--sport {p} " in r + " "
                                           for r in rules)]
    if missing:
        yield Check("nfqueue rule (IPv6)", "SKIP", "no ip6tables NFQUEUE rule for port(s) "
                    f"{', '.join(map(str, missing))}: interceptd takes no IPv6 session (an "
                    "interceptd that runs installs them where ip6tables is present: apt "
                    "install iptables)")
    else:
        yield ok("nfqueue rule (IPv6)", f"ports {', '.join(map(str, cfg.service_port))} in "
                 "ip6tables OUTPUT: IPv6 sessions are taken")


# ------------------------------------------------------------------ command
def net24(addr: str) -> str:
    """The client's network as a route names it: its /24, or its /64 for IPv6."""
    return str(ipaddress.ip_network(f"{addr}/{64 if ':' in addr else 24}", strict=False))


def render(checks: Sequence[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"{c.status:<5} {c.name}: {c.detail}")
        if c.fix:
            lines.append(f"      fix: {c.fix}")
    return "\n".join(lines)


def run(role: str, argv: list[str], clients: list[str],
        out: Callable[[str], None] = print) -> int:
    if role == "tcpcopyd":
        from tcpcopyd.online.options import LAYOUT, REGISTRY
        checks: Callable[[Config], Iterator[Check]] = online_checks
    else:
        from interceptd.options import LAYOUT, REGISTRY

        def checks(cfg: Config) -> Iterator[Check]:
            return target_checks(cfg, clients)
    try:
        cfg = load(f"tcpcopyctl doctor {role}", "", REGISTRY, argv, LAYOUT)
        load_secret(cfg)
    except ConfigError as e:
        out(f"FAIL  config: {e}")
        return 1
    results = []
    for c in checks(cfg):
        results.append(c)
        out(render([c]))
    failed = sum(c.status == "FAIL" for c in results)
    skipped = sum(c.status == "SKIP" for c in results)
    out(f"{failed} failed, {len(results) - failed - skipped} passed, {skipped} skipped")
    return 1 if failed else 0
