"""interceptd's assistant mode: the target routes the replies for the clients to another
host, which does not forward them; interceptd there captures them (AF_PACKET fanout
workers, no NFQUEUE, no iptables) and feeds them back. The core figures hold."""
from __future__ import annotations

import collections

import pytest

from tcpcopyd.lab import load
from tests.lab.conftest import target_caught_up

pytestmark = pytest.mark.lab

ASSISTANT = {"assistant": True}


@pytest.mark.parametrize("lab", [ASSISTANT], indirect=True)
def test_short_and_keepalive_http_through_an_assistant(lab):
    title = lab.ns.run(lab.ns.assistant, ["ps", "-eo", "args="]).stdout
    assert "interceptd: worker 1/" in title and "capture=eth0" in title
    rules = lab.ns.run(lab.ns.assistant, ["iptables", "-w", "5", "-S", "OUTPUT"]).stdout
    assert "NFQUEUE" not in rules
    r = load.h2load(lab, requests=20000, rate=1000)
    assert r.succeeded == 20000, r.output
    r = load.h2load(lab, requests=10000, rate=1000, per_connection=10)
    assert r.succeeded == 10000, r.output
    target = target_caught_up(lab, 30000)
    assert len(target) == 30000
    assert all(f[2] == "200" for f in target)
    online = lab.nginx_log("online")
    assert collections.Counter((f[1], f[3]) for f in target) == \
        collections.Counter((f[1], f[3]) for f in online)


@pytest.mark.parametrize("lab", [ASSISTANT], indirect=True)
def test_doctor_on_the_assistant_host(lab):
    from tcpcopyd.lab.lab import bin_path
    args = [bin_path("tcpcopyctl"), "doctor", "interceptd", "--service-port", "80",
            "-i", "eth0"]
    r = lab.ns.run(lab.ns.assistant, args, check=False, timeout=60)
    assert r.returncode == 0, r.stdout
    assert "OK    no forwarding: " in r.stdout and "OK    assistant interface: " in r.stdout
    lab.ns.sysctl(lab.ns.assistant, {"net/ipv4/ip_forward": "1"})
    try:
        r = lab.ns.run(lab.ns.assistant, args, check=False, timeout=60)
        assert r.returncode == 1
        assert "FAIL  no forwarding: this host forwards IPv4" in r.stdout
        assert "fix: sysctl -w net.ipv4.ip_forward=0" in r.stdout
        # and interceptd itself will not start there in assistant mode
        from tcpcopyd.lab.lab import command
        r = lab.ns.run(lab.ns.assistant, [*command("interceptd"), "--service-port", "80",
                                          "-i", "eth0", "--instance", "fwd-test"],
                       check=False, timeout=60)
        assert r.returncode == 78, r.stderr
        assert "assistant mode on a host that forwards IPv4" in r.stderr
    finally:
        lab.ns.sysctl(lab.ns.assistant, {"net/ipv4/ip_forward": "0"})


# Frames a hostile host on the assistant's network segment sends it: IPv4/TCP from the
# target's service port whose lengths lie (IP options and a total length shorter than the
# headers: the frame that killed assistant workers, #19), bad data offsets, random tails.
# They go out of the target's link to the assistant as raw Ethernet frames, so no kernel
# checks them before interceptd's capture does.
MALFORMED_FRAMES = r'''
import random, socket, sys
from tcpcopyd.net import packet as P
iface, n = sys.argv[1], int(sys.argv[2])
dst_mac = bytes.fromhex(sys.argv[3])
src_mac = bytes.fromhex(open(f"/sys/class/net/{iface}/address").read().strip()
                        .replace(":", ""))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((iface, 0))
rng = random.Random(19)
target, client = socket.inet_aton("198.18.2.2"), socket.inet_aton("198.18.1.1")
sent = 0
for i in range(n):
    port, seq, ack = 40000 + rng.randrange(2000), rng.randrange(1 << 32), rng.randrange(1 << 32)
    payload = rng.randbytes(rng.randrange(40))
    ip = bytearray(P.build(target, client, 80, port, seq, ack, P.ACK, 1000, b"", payload))
    kind = i % 4
    if kind == 0:        # options, total length below the header
        ip[20:20] = bytes(8); ip[0] = 0x47; ip[2:4] = rng.randrange(0, 28).to_bytes(2, "big")
    elif kind == 1:      # data offset beyond the packet, or below 5
        ip[32] = rng.choice((0x00, 0x10, 0xF0, 0xA0))
    elif kind == 2:      # IHL below 5, or far beyond the frame
        ip[0] = 0x40 | rng.choice((0, 1, 4, 15))
    else:                # cut short
        del ip[rng.randrange(21, 40):]
    s.send(dst_mac + src_mac + b"\x08\x00" + bytes(ip))
    sent += 1
print(f"sent={sent}")
'''


@pytest.mark.parametrize("lab", [ASSISTANT], indirect=True)
def test_malformed_frames_at_the_assistant_stop_no_worker(lab):
    import threading

    from tests.lab.test_copies import totals
    ns = lab.ns
    mac = ns.run(ns.assistant, ["cat", "/sys/class/net/eth0/address"]).stdout.strip()
    result = {}
    t = threading.Thread(target=lambda: result.update(
        r=load.h2load(lab, requests=4000, rate=500, path="/?under=attack")))
    t.start()
    try:
        out = load.python_in(lab, ns.target, MALFORMED_FRAMES, "eth2", 20000,
                             mac.replace(":", ""))
    finally:
        t.join()
    assert "sent=20000" in out.stdout, out.stderr
    assert result["r"].succeeded == 4000, result["r"].output
    target = target_caught_up(lab, 4000)
    assert sum(1 for f in target if f[6] == "/?under=attack" and f[2] == "200") == 4000
    c = totals(lab, "interceptd")
    # a quarter are the frame that killed workers (options, short total length): the
    # capture filter passes them all; of the others it passes those whose ports it finds
    assert c["malformed"] >= 4500, c          # seen, counted, skipped
    assert "exited with" not in lab.log_text("interceptd")   # no worker died
