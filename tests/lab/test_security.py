"""A hostile neighbour on the target's network (the lab's attacker namespace, 198.18.9.1)
against interceptd and, through the assistant host, tcpcopyd: what it tries is refused and
counted, the copy of a real load loses nothing and no reply of the target leaks (the lab
fixture counts leaks and checks the rules and segments at the end)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import orjson
import psutil
import pytest

from shm import segment as shmseg
from tcpcopyd.health import status
from tcpcopyd.lab import load
from tcpcopyd.lab.lab import command, wait_for
from tcpcopyd.lab.net import (
    ATTACKER_IP,
    CLIENT_IP,
    ONLINE2_TARGET_SIDE_IP,
    ONLINE_TARGET_SIDE_IP,
    TARGET_ATTACKER_SIDE_IP,
    TARGET_IP,
)
from tcpcopyd.net import wire
from tests.lab.conftest import ctl_status, target_caught_up

pytestmark = pytest.mark.lab

ATTACKER = {"memcached": False, "attacker": True}
# interceptd admits the attacker's network too: the worst case, a host that may connect
OPEN_ALLOW = ["--allow", f"127.0.0.0/8,{ONLINE_TARGET_SIDE_IP},{ONLINE2_TARGET_SIDE_IP},"
              "198.18.9.0/24"]


def attack(lab, *args: str, timeout: float = 120) -> dict[str, str]:
    """Run ``python -m tcpcopyd.lab.attack ARGS`` in the attacker namespace."""
    r = lab.ns.run(lab.ns.attacker, [sys.executable, "-m", "tcpcopyd.lab.attack", *args],
                   check=False, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    out = dict(kv.split("=", 1) for kv in lines[0].split())
    for line in lines[1:]:
        if line.startswith("reason: "):
            out["reason"] = line[len("reason: "):]
    return out


def totals(lab, name: str) -> dict[str, int]:
    seg = shmseg.attach(f"{lab.ns.prefix}-{name}")
    try:
        return status.totals(seg)
    finally:
        seg.close()


def restart_interceptd(lab, extra: list[str]) -> None:
    seen = lab.log_text("tcpcopyd").count("connected to interceptd")
    lab.stop("interceptd")
    lab.start_interceptd(extra=extra)
    lab.wait_log("tcpcopyd", "connected to interceptd", count=seen + 1, timeout=30)


def live_client_ports(lab, n: int) -> list[int]:
    """Client ports of the keep-alive connections the online server is serving."""
    ports = {int(f[1]) for f in lab.nginx_log("online") if f[0] == CLIENT_IP}
    assert len(ports) >= n, ports
    return sorted(ports)[:n]


def keepalive_load(lab, total: int = 10000, connections: int = 100, rate: int = 1000):
    return load.paced_keepalive(lab, connections=connections,
                                per_connection=total // connections, rate=rate)


def finish(lab, client: subprocess.Popen, total: int) -> None:
    """The load completed on the client and every request of it reached the target."""
    out, _ = client.communicate(timeout=180)
    assert load.kv(out) == {"ok": total, "errors": 0}, out
    target = target_caught_up(lab, total, timeout=60)
    assert sum(1 for f in target if f[2] == "200") == total, \
        f"{total - len(target)} lost; tcpcopyd {totals(lab, 'tcpcopyd')}"


@pytest.mark.parametrize("lab", [ATTACKER], indirect=True)
def test_a_host_not_allowed_is_refused_told_why_and_logged_once(lab):
    for _ in range(3):
        got = attack(lab, "register", TARGET_ATTACKER_SIDE_IP, str(wire.DEFAULT_PORT),
                     f"{CLIENT_IP}:40000", "--hello", "--seconds", "3")
        assert got["refused"] == "1" and got["closed"] == "1" and got["headers"] == "0"
        assert got["reason"] == ("198.18.9.1 is not in its allow list (add our address to "
                                 "allow in /etc/interceptd.conf on the target host)")
    got = attack(lab, "register", TARGET_ATTACKER_SIDE_IP, str(wire.DEFAULT_PORT),
                 f"{CLIENT_IP}:40001", "--seconds", "3")           # a C tcpcopy: no offer
    assert got["closed"] == "1" and got["refused"] == "0"
    wait_for(lambda: totals(lab, "interceptd")["peers_refused"] == 4, 10,
             "4 refusals counted")
    assert totals(lab, "interceptd")["routes"] == 0
    assert lab.log_text("interceptd").count(f"refused a control connection from "
                                            f"{ATTACKER_IP}") == 1


@pytest.mark.parametrize("lab", [{"memcached": False}], indirect=True)
def test_the_doctor_on_the_online_host_says_it_is_not_allowed(lab):
    restart_interceptd(lab, ["--allow", "127.0.0.0/8"])
    r = lab.ns.run(lab.ns.online, [*command("tcpcopyctl"), "doctor", "tcpcopyd", "-x",
                                   f"80-{TARGET_IP}:80", "-s", TARGET_IP, "-i", "eth0"],
                   check=False, timeout=60)
    assert r.returncode == 1
    assert (f"FAIL  protocol version: interceptd at {TARGET_IP}:36524 refused us, "
            f"{ONLINE_TARGET_SIDE_IP}: {ONLINE_TARGET_SIDE_IP} is not in its allow list\n"
            "      fix: add our address to allow in /etc/interceptd.conf on the target "
            "host") in r.stdout, r.stdout
    # the workers reconnect with a backoff, each on its own: wait for the first refusal
    lab.wait_log("tcpcopyd", f"interceptd {TARGET_IP}:36524: refused us: "
                 f"{ONLINE_TARGET_SIDE_IP} is not in its allow list (add our address to allow")


@pytest.mark.parametrize("lab", [ATTACKER], indirect=True)
def test_a_rogue_registration_of_live_sessions_is_refused_under_load(lab):
    restart_interceptd(lab, OPEN_ALLOW)
    total = 10000
    client = keepalive_load(lab, total)
    try:
        wait_for(lambda: len(lab.nginx_log("online")) >= 2000, 60, "2000 requests online")
        keys = ",".join(f"{CLIENT_IP}:{p}" for p in live_client_ports(lab, 100))
        got = attack(lab, "register", TARGET_ATTACKER_SIDE_IP, str(wire.DEFAULT_PORT), keys,
                     "--hello", "--seconds", "4")
        assert got["headers"] == "0" and got["closed"] == "0"   # let in, given nothing
        finish(lab, client, total)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert totals(lab, "interceptd")["routes_refused"] >= 100


def worker_rss(lab, name: str) -> list[int]:
    master = psutil.Process(lab.procs[name].pid)
    procs = [c for c in master.children(recursive=True) if "worker" in " ".join(c.cmdline())]
    return [p.memory_info().rss for p in procs]


# README "Security model": a worker's memory for the routes of one address, at the default
# max_routes_per_address, stays under this
ROUTES_MEMORY_MIB = 64


def route_flood(lab, seed: int) -> subprocess.Popen:
    return subprocess.Popen(
        ["ip", "netns", "exec", lab.ns.attacker, sys.executable, "-m", "tcpcopyd.lab.attack",
         "flood-routes", TARGET_ATTACKER_SIDE_IP, str(wire.DEFAULT_PORT), "--connections",
         "16", "--registrations", "800000", "--hold", "3", "--seed", str(seed)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("lab", [ATTACKER], indirect=True)
def test_a_registration_flood_keeps_memory_bounded_and_loses_nothing(lab):
    restart_interceptd(lab, OPEN_ALLOW)
    rss = [worker_rss(lab, "interceptd")]
    outs = []
    drops = []
    for seed in (1, 2):                  # twice as many registrations: no more memory
        flood = route_flood(lab, seed)
        try:
            wait_for(lambda seed=seed: totals(lab, "interceptd")["client_add"]
                     >= 400000 * seed, 120, "the flood to reach interceptd")
            r = load.h2load(lab, requests=2500, rate=500)
            assert r.succeeded == 2500
            outs.append(flood.communicate(timeout=180)[0].strip())
            # interceptd reads a flood at its own pace (a bounded share of each turn): all
            # of it read before its memory is measured
            wait_for(lambda seed=seed: totals(lab, "interceptd")["client_add"]
                     >= 800000 * seed, 120, "interceptd to read the whole flood")
        finally:
            if flood.poll() is None:
                flood.kill()
                flood.wait()
        rss.append(worker_rss(lab, "interceptd"))
        # every request of this round on the target before the next round: its clients
        # reuse this round's ports, and a session that the flood has slowed would be
        # replaced by the new one on its port (port reuse, not the flood, would lose it)
        got = len(target_caught_up(lab, 2500 * seed))
        c = totals(lab, "interceptd")
        drops.append(c["queue_drops"])
        assert got == 2500 * seed, (f"{2500 * seed - got} lost; interceptd {c}; tcpcopyd "
                                    f"{totals(lab, 'tcpcopyd')}")
    mib = [[v >> 20 for v in r] for r in rss]
    print(f"registration flood {outs}: interceptd worker RSS before {mib[0]} MiB, after "
          f"800 000 registrations {mib[1]} MiB, after 1 600 000 {mib[2]} MiB; client_add "
          f"{c['client_add']}, routes {c['routes']}, over limit {c['routes_over_limit']}; "
          f"packets of the target the queue dropped {drops}")
    # one address holds at most max_routes_per_address routes per worker: the memory
    # stays under the bound the README gives (unbounded, 1 600 000 routes would take
    # about 600 MiB)
    growth = [(max(b, c2) - a) >> 20 for a, b, c2 in zip(*rss, strict=True)]
    assert max(growth) <= ROUTES_MEMORY_MIB, growth
    assert c["routes_over_limit"] > 0
    # the flood waited in its sockets, not the target's packets in the queue
    assert drops == [0, 0]


@pytest.mark.parametrize("lab", [{**ATTACKER, "interceptd": False, "tcpcopyd": False}],
                         indirect=True)
def test_a_connection_flood_out_of_descriptors_does_not_spin(lab):
    # interceptd with few descriptors: the flood exhausts them
    lab.start("interceptd", lab.ns.target,
              ["prlimit", "--nofile=200:200", *command("interceptd"), "--service-port", "80",
               "--instance", f"{lab.ns.prefix}-interceptd", *OPEN_ALLOW,
               "--max-connections", "5000", "--max-connections-per-address", "5000"])
    lab.wait_log("interceptd", ", control port ")
    lab.start_tcpcopyd(ports=[80])
    flood = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns.attacker, sys.executable, "-m", "tcpcopyd.lab.attack",
         "flood-connections", TARGET_ATTACKER_SIDE_IP, str(wire.DEFAULT_PORT),
         "--connections", "3000", "--hold", "6"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: totals(lab, "interceptd")["accept_paused"] > 0, 30,
                 "interceptd to run out of descriptors")
        workers = [p for p in psutil.Process(lab.procs["interceptd"].pid).children()]
        for p in workers:
            p.cpu_percent(None)
        time.sleep(2.0)
        cpu = [p.cpu_percent(None) for p in workers]
        out, _ = flood.communicate(timeout=120)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
    c = totals(lab, "interceptd")
    print(f"connection flood: {out.strip()}; interceptd workers' CPU while out of "
          f"descriptors {cpu} %; accept paused {c['accept_paused']} times, over limit "
          f"{c['peers_over_limit']}, handshake timeouts {c['handshake_timeouts']}")
    assert max(cpu) < 40, cpu                     # a spinning worker shows ~100 %
    # the attacker's connections time out; the copy goes on
    r = load.h2load(lab, requests=1000, rate=500)
    assert r.succeeded == 1000
    assert len(target_caught_up(lab, 1000)) == 1000


@pytest.mark.parametrize("lab", [{"memcached": False}], indirect=True)
def test_a_second_interceptd_of_the_same_name_fails_and_changes_nothing(lab):
    def rules() -> str:
        return lab.ns.run(lab.ns.target, ["iptables", "-w", "5", "-S", "OUTPUT"]).stdout
    before = rules()
    total = 5000
    client = keepalive_load(lab, total, rate=500)
    try:
        wait_for(lambda: len(lab.nginx_log("online")) >= 1000, 60, "1000 requests online")
        r = lab.ns.run(lab.ns.target, [*command("interceptd"), "--service-port", "80,11211",
                                       "--instance", f"{lab.ns.prefix}-interceptd",
                                       "--port", "36525", "--queue-num", "7"],
                       check=False, timeout=30)
        assert r.returncode == 1
        assert f"instance '{lab.ns.prefix}-interceptd' is already running (pid " \
            f"{lab.procs['interceptd'].pid})" in r.stderr, r.stderr
        assert rules() == before
        finish(lab, client, total)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


@pytest.mark.parametrize("lab", [{**ATTACKER, "assistant": True}], indirect=True)
def test_forged_replies_and_resets_through_the_assistant_change_nothing(lab):
    total = 10000
    client = keepalive_load(lab, total)
    try:
        wait_for(lambda: len(lab.nginx_log("online")) >= 2000, 60, "2000 requests online")
        ports = ",".join(map(str, live_client_ports(lab, 100)))
        # replies from a host that is not the target: dropped by interceptd
        attack(lab, "forge", ATTACKER_IP, CLIENT_IP, "80", ports, "--payload", "100",
               "--count", "5")
        wait_for(lambda: totals(lab, "interceptd")["replies_foreign"] >= 400, 20,
                 "the forged replies to be counted")
        # resets that claim to come from the target, at random sequence numbers: tcpcopyd
        # ignores them (RFC 5961), or answers with a challenge ACK if one falls in window
        attack(lab, "forge", TARGET_IP, CLIENT_IP, "80", ports, "--flags", "4",
               "--count", "5")
        wait_for(lambda: sum(totals(lab, "tcpcopyd")[k] for k in
                             ("resets_out_of_window", "challenge_acks")) >= 400, 20,
                 "the forged resets to be counted")
        finish(lab, client, total)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    c = totals(lab, "tcpcopyd")
    assert c["sessions_target_rst"] == 0, c


@pytest.mark.parametrize("lab", [{**ATTACKER, "interceptd": False, "tcpcopyd": False}],
                         indirect=True)
def test_with_a_shared_secret_the_copy_works_and_others_are_refused(lab):
    secret = os.path.join(lab.dir, "secret")
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"a secret of the lab, 32 bytes long\n")
    os.close(fd)
    lab.start_interceptd(extra=[*OPEN_ALLOW, "--secret-file", secret])
    lab.start_tcpcopyd(extra=["--secret-file", secret])
    lab.wait_log("tcpcopyd", "(shared secret proved both ways; every batch tagged)")
    got = attack(lab, "register", TARGET_ATTACKER_SIDE_IP, str(wire.DEFAULT_PORT),
                 f"{CLIENT_IP}:40000", "--hello", "--seconds", "3")
    assert got["refused"] == "1" and got["reason"] == (
        "it wants the shared secret (give tcpcopyd the same secret_file as interceptd)")
    r = load.h2load(lab, requests=2000, rate=500)
    assert r.succeeded == 2000
    assert len(target_caught_up(lab, 2000)) == 2000
    wait_for(lambda: totals(lab, "interceptd")["auth_failures"] == 1, 10,
             "the refusal to be counted")


def write_secret(lab, words: bytes) -> str:
    path = os.path.join(lab.dir, "secret")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, words)
    os.close(fd)
    return path


@pytest.mark.parametrize("lab", [{"memcached": False, "interceptd": False, "tcpcopyd": False}],
                         indirect=True)
def test_with_a_secret_tcpcopyd_copies_nothing_to_an_interceptd_that_cannot_prove_it(lab):
    """No silent fallback: an interceptd without the secret is not used, and so nothing is
    sent to its target (held, counted, and said in status) until one that proves it comes."""
    lab.start_interceptd()                        # no secret
    lab.start_tcpcopyd(extra=["--secret-file", write_secret(lab, b"only tcpcopyd knows it")],
                       wait_connected=False)
    lab.wait_log("tcpcopyd", "it has no shared secret (give interceptd the same secret_file")
    r = load.h2load(lab, requests=500, rate=250)
    assert r.succeeded == 500
    wait_for(lambda: totals(lab, "tcpcopyd")["held_no_link"] > 0, 20,
             "the copies to be held")
    assert lab.nginx_log("target") == []          # not one request reached the target
    [st] = orjson.loads(ctl_status(f"{lab.ns.prefix}-tcpcopyd").stdout)
    assert st["state"] != "healthy" and [link["state"] for link in st["links"]] == ["down"]
    assert "it has no shared secret" in st["links"][0]["reason"], st["links"]
