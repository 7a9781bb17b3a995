"""Who may speak on the control channel, with real sockets on loopback: the allow list, the
shared secret (both sides of the handshake), speaking first, the limits; the router's
ownership of routes, its limits, its source check and its bounded delay-table work."""
from __future__ import annotations

import select
import socket
import time

import pytest

from interceptd import counters as IC
from interceptd import router as R
from interceptd.control import ControlServer, Peer
from interceptd.router import Router
from tcpcopyd.net import auth, wire
from tcpcopyd.net import packet as P
from tcpcopyd.online.control import ControlLink

LOOPBACK = (__import__("ipaddress").IPv4Network("127.0.0.0/8"),)
ELSEWHERE = (__import__("ipaddress").IPv4Network("198.18.9.0/24"),)
SECRET = b"0123456789abcdef-shared"
CIP, TIP = socket.inet_aton("198.18.1.1"), socket.inet_aton("198.18.2.2")


def count(counters: list[int], name: str) -> int:
    return counters[IC.INDEX[name]]


class Server:
    """interceptd's control side on 127.0.0.1, pumped by hand."""

    def __init__(self, **kw) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.ep = select.epoll()
        self.counters = [0] * len(IC.NAMES)
        self.router = Router(self.counters)
        kw.setdefault("allow", LOOPBACK)
        self.control = ControlServer(self.listener, self.ep, self.router, self.counters, 0,
                                     **kw)

    def pump(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            now = time.monotonic()
            for fd, ev in self.ep.poll(0.01):
                self.control.on_event(fd, ev, now)
            self.control.flush()

    def close(self) -> None:
        self.control.close()
        self.listener.close()
        self.ep.close()


@pytest.fixture
def server():
    made = []

    def make(**kw) -> Server:
        made.append(Server(**kw))
        return made[-1]
    yield make
    for s in made:
        s.close()


def client(srv: Server, *messages: bytes) -> socket.socket:
    c = socket.create_connection(("127.0.0.1", srv.port))
    c.settimeout(2)
    if messages:
        c.sendall(b"".join(messages))
    srv.pump()
    return c


def answer(c: socket.socket) -> tuple | None:
    """interceptd's extension frame, None if it closed the connection without one."""
    data = b""
    while len(data) < 2 + wire.REPLY_SIZE:
        try:
            chunk = c.recv(4096)
        except (ConnectionResetError, TimeoutError):
            return None
        if not chunk:
            return None
        data += chunk
    assert wire.COMBINED_HEAD.unpack_from(data, 0).count == wire.EXT_MARK
    return wire.EXT.unpack_from(data, 2)


def closed(c: socket.socket) -> bool:
    try:
        return c.recv(4096) == b""
    except ConnectionResetError:
        return True


def add(port: int) -> bytes:
    return wire.client_message(wire.CLIENT_ADD, CIP, port, TIP, 80)


HELLO = wire.hello_message(0)
HELLO_AUTH = wire.hello_message(wire.FEATURE_AUTH)


def test_a_peer_not_allowed_is_told_why_and_dropped(server):
    srv = server(allow=ELSEWHERE)
    c = client(srv, wire.version_message(), HELLO, add(40000))
    ext = answer(c)
    assert ext.kind == wire.EXT_REFUSED and ext.features == wire.NOT_ALLOWED
    assert wire.refusal_reason(ext) == ("127.0.0.1 is not in its allow list (add our address "
                                        "to allow in /etc/interceptd.conf on the target host)")
    assert closed(c)
    assert count(srv.counters, "peers_refused") == 1 and not srv.router.routes


def test_a_c_tcpcopy_that_is_allowed_registers_without_extensions(server):
    srv = server()
    c = client(srv, wire.version_message(), add(40000))
    assert list(srv.router.routes) == [CIP + (40000).to_bytes(2, "big")]
    c.close()


def test_the_first_message_must_be_the_version(server):
    srv = server()
    c = client(srv, add(40000))
    assert closed(c) and count(srv.counters, "bad_peers") == 1 and not srv.router.routes


def test_a_silent_peer_is_dropped_after_the_handshake_timeout(server):
    srv = server()
    c = client(srv)
    srv.control.tick(time.monotonic() + 60)
    assert closed(c) and count(srv.counters, "handshake_timeouts") == 1


def test_connections_beyond_the_limit_per_address_are_closed_at_once(server):
    srv = server(max_peers_per_address=2)
    kept = [client(srv, wire.version_message()), client(srv, wire.version_message())]
    extra = client(srv)
    assert closed(extra) and count(srv.counters, "peers_over_limit") == 1
    assert len(srv.control) == 2
    for c in kept:
        c.close()


def test_silent_peers_cannot_keep_a_tcpcopyd_out(server):
    """A flood of connections that never speak holds every slot: a tcpcopyd that connects
    then still gets in (the oldest silent one makes room), and a working one is never
    displaced."""
    srv = server(max_peers=8, max_peers_per_address=8)
    working = client(srv, wire.version_message(), add(40000))
    silent = [client(srv) for _ in range(40)]
    assert len(srv.control) == 8
    assert count(srv.counters, "peers_displaced") == 40 - 7
    late = client(srv, wire.version_message(), add(40002))
    assert len(srv.router.routes) == 2                 # both tcpcopyds registered
    for c in silent[-6:]:
        c.sendall(wire.version_message())
    srv.pump()
    assert not closed_now(working) and not closed_now(late)
    for c in [working, late, *silent]:
        c.close()


def closed_now(c: socket.socket) -> bool:
    c.setblocking(False)
    try:
        return c.recv(4096) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        c.setblocking(True)
        c.settimeout(2)


def test_a_first_message_of_zeros_never_reaches_the_router(server):
    srv = server()
    c = client(srv, wire.client_message(wire.CLIENT_ADD, bytes(4), 0, bytes(4), 0))
    assert closed(c) and not srv.router.routes
    assert count(srv.counters, "bad_peers") == 1


def handshake(srv: Server, secret: bytes = SECRET) -> tuple[socket.socket, auth.Tagger,
                                                             auth.Tagger]:
    """A tcpcopyd done by hand: both proofs; (its socket, its writer, its reader)."""
    ours = auth.nonce()
    c = client(srv, wire.version_message(), HELLO_AUTH, wire.challenge_messages(ours))
    ext = answer(c)
    assert ext.kind == wire.EXT_WELCOME and ext.features & wire.FEATURE_AUTH
    theirs, proof = wire.welcome_proof(ext)
    seen = auth.transcript(ours, theirs, wire.FEATURE_AUTH, ext.features)
    assert proof == auth.server_proof(SECRET, seen)      # interceptd proved it
    c.sendall(wire.proof_messages(auth.client_proof(secret, seen)))
    srv.pump()
    writer, reader = auth.pair(SECRET, seen, tcpcopyd=True)
    return c, writer, reader


def tagged(writer: auth.Tagger, *messages: bytes) -> bytes:
    batch = b"".join(messages)
    return batch + wire.tag_message(writer.tag(batch))


def test_with_a_secret_registrations_wait_for_the_proof_and_their_tag(server):
    srv = server(secret=SECRET)
    c, writer, _ = handshake(srv)
    batch = add(40000) + add(40001)
    c.sendall(batch)               # not tagged yet: held
    srv.pump()
    assert not srv.router.routes
    c.sendall(wire.tag_message(writer.tag(batch)) + tagged(writer, add(40002)))
    srv.pump()
    assert len(srv.router.routes) == 3 and count(srv.counters, "auth_failures") == 0
    c.close()


@pytest.mark.parametrize("how", ["changed", "replayed", "untagged", "tag only"])
def test_a_batch_that_does_not_check_ends_the_connection_and_is_not_used(server, how):
    srv = server(secret=SECRET)
    c, writer, _ = handshake(srv)
    first = tagged(writer, add(40000))
    c.sendall(first)
    srv.pump()
    assert len(srv.router.routes) == 1
    if how == "changed":           # an on-path attacker rewrites the client port
        bad = bytearray(tagged(writer, add(40001)))
        bad[5] ^= 1
    elif how == "replayed":        # the same batch again: its counter has passed
        bad = first
    elif how == "untagged":        # more than a batch may hold, never tagged
        bad = add(40001) * (wire.UNTAGGED_UP_MAX // wire.CLIENT_MSG_SIZE + 1)
    else:                          # a tag of the right size but made without the key
        bad = add(40001) + wire.tag_message(bytes(auth.TAG_SIZE))
    c.sendall(bad)
    srv.pump()
    assert closed(c) and len(srv.router.routes) == 0    # its routes go with it
    assert count(srv.counters, "auth_failures") == (0 if how == "untagged" else 1)


@pytest.mark.parametrize("how", ["wrong secret", "no proof", "no offer (C tcpcopy)",
                                 "no challenge"])
def test_with_a_secret_a_peer_without_the_proof_is_refused(server, how):
    srv = server(secret=SECRET)
    if how == "no offer (C tcpcopy)":
        c = client(srv, wire.version_message(), add(40000))
        assert closed(c)
    elif how == "wrong secret":
        c, _, _ = handshake(srv, b"another secret of 16+ bytes")
        ext = answer(c)
        assert ext.kind == wire.EXT_REFUSED and b"secret" in ext.body
    elif how == "no challenge":     # an offer of the secret, then a registration at once
        c = client(srv, wire.version_message(), HELLO_AUTH, add(40000))
        ext = answer(c)
        assert ext.kind == wire.EXT_REFUSED and b"secret" in ext.body
    else:
        c = client(srv, wire.version_message(), HELLO)
        ext = answer(c)
        assert ext.kind == wire.EXT_REFUSED and b"secret" in ext.body
    assert not srv.router.routes and count(srv.counters, "auth_failures") == 1


def pump_link(srv: Server, link: ControlLink, ep: select.epoll, seconds: float = 1.0,
              until_up: bool = True) -> bool:
    """Run the link against the server; True once it came up."""
    came_up = False
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until_up and came_up):
        now = time.monotonic()
        came_up |= link.maybe_connect(now)
        for _fd, ev in ep.poll(0.01):
            came_up |= link.on_event(ev, now)[1]
        srv.pump(1)
    return came_up


def reply_to(port: int) -> bytes:
    return wire.reply_header(P.build(TIP, CIP, 80, port, 1, 2, P.ACK, 1000))


@pytest.mark.parametrize("secrets", [(SECRET, SECRET), (None, None)], ids=["both", "neither"])
def test_tcpcopyd_and_interceptd_complete_the_handshake(server, secrets):
    srv = server(secret=secrets[0])
    ep = select.epoll()
    link = ControlLink("127.0.0.1", srv.port, ep, secrets[1])
    try:
        assert pump_link(srv, link, ep, 3.0)
        assert (link.writer is not None) == bool(secrets[0])
        link.queue(add(40000))
        link.flush(time.monotonic())
        srv.pump()
        assert len(srv.router.routes) == 1
        for _ in range(3):
            srv.router.deliver(reply_to(40000), time.monotonic())
        srv.pump()
        got: list[bytes] = []
        deadline = time.monotonic() + 3
        while len(got) < 3 and time.monotonic() < deadline:
            for _fd, ev in ep.poll(0.05):
                got += link.on_event(ev, time.monotonic())[0]
        assert got == [reply_to(40000)] * 3 and link.up
    finally:
        link.close()
        ep.close()


def fake_interceptd(answer_with) -> tuple[socket.socket, int]:
    """A listener whose first connection gets ``answer_with(what it sent)`` (in a thread)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)

    def serve() -> None:
        conn, _ = lst.accept()
        with conn:
            conn.settimeout(3)
            data = b""
            want = 2 * wire.CLIENT_MSG_SIZE + wire.CHALLENGE_PARTS * wire.CLIENT_MSG_SIZE
            while len(data) < want:
                chunk = conn.recv(want - len(data))
                if not chunk:
                    return
                data += chunk
            conn.sendall(answer_with(data))
            try:
                conn.recv(4096)      # held open until the link gives up
            except OSError:
                pass
    __import__("threading").Thread(target=serve, daemon=True).start()
    return lst, lst.getsockname()[1]


@pytest.mark.parametrize("how", ["only tcpcopyd has it", "a wrong proof", "silent (C intercept)",
                                 "replies before the proofs"])
def test_tcpcopyd_with_a_secret_uses_no_interceptd_that_cannot_prove_it(server, how,
                                                                         monkeypatch):
    monkeypatch.setattr("tcpcopyd.online.control.HELLO_WAIT", 0.5)

    def answer_with(data: bytes) -> bytes:
        if how == "silent (C intercept)":
            return b""
        if how == "replies before the proofs":
            return wire.combine([reply_to(40000)])
        # a WELCOME that claims the secret, with a proof made without it
        return wire.welcome_frame(wire.FEATURE_AUTH, auth.nonce(), bytes(auth.SERVER_PROOF_SIZE))
    srv = server(secret=None) if how == "only tcpcopyd has it" else None
    lst, port = (None, srv.port) if srv is not None else fake_interceptd(answer_with)
    ep = select.epoll()
    link = ControlLink("127.0.0.1", port, ep, SECRET)
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not link.errors:
            now = time.monotonic()
            assert not link.maybe_connect(now)
            for _fd, ev in ep.poll(0.01):
                assert link.on_event(ev, now) == ([], False)
            if srv is not None:
                srv.pump(1)
        assert not link.up and link.errors == 1
        reason = {"only tcpcopyd has it": "it has no shared secret",
                  "a wrong proof": "its proof of the shared secret is wrong",
                  "silent (C intercept)": "did not answer our offer within 0.5s",
                  "replies before the proofs": "reply headers before the handshake"}[how]
        assert reason in link.reason, link.reason
    finally:
        link.close()
        ep.close()
        if lst is not None:
            lst.close()


def test_tcpcopyd_without_the_secret_logs_why_it_is_refused(server, caplog):
    srv = server(secret=SECRET)
    ep = select.epoll()
    link = ControlLink("127.0.0.1", srv.port, ep, None)
    try:
        pump_link(srv, link, ep, 1.0, until_up=False)
        assert not link.up and link.errors >= 1
        assert "refused us: it wants the shared secret (give tcpcopyd the same secret_file" \
            in caplog.text
    finally:
        link.close()
        ep.close()


# ---------------------------------------------------------------- the router
def peer(address: str) -> Peer:
    return Peer(socket.socket(), address, address=socket.inet_aton(address))


def message(r: Router, p: Peer, kind: int, port: int, target: bytes = TIP) -> None:
    r.on_message(p, kind, CIP, port, 1.0, target, 80)


def test_a_session_held_by_another_address_is_refused_a_sibling_may_move_it():
    cnt = [0] * len(IC.NAMES)
    r = Router(cnt)
    tcpcopyd, sibling, rogue = peer("198.18.2.1"), peer("198.18.2.1"), peer("198.18.9.1")
    try:
        message(r, tcpcopyd, wire.CLIENT_ADD, 40000)
        message(r, rogue, wire.CLIENT_ADD, 40000)
        message(r, rogue, wire.CLIENT_DEL, 40000)
        key = CIP + (40000).to_bytes(2, "big")
        assert r.routes[key][0] is tcpcopyd and count(cnt, "routes_refused") == 1
        message(r, sibling, wire.CLIENT_ADD, 40000)     # another connection of the same host
        assert r.routes[key][0] is sibling and not r.routes_of(tcpcopyd)
        message(r, tcpcopyd, wire.CLIENT_DEL, 40000)    # ended on another connection (C)
        assert not r.routes and not r.routes_of(sibling) and not r.by_address
    finally:
        for p in (tcpcopyd, sibling, rogue):
            p.sock.close()


def test_an_address_beyond_its_share_loses_its_oldest_routes_the_total_is_refused():
    cnt = [0] * len(IC.NAMES)
    r = Router(cnt, max_routes=24, max_routes_per_address=16)
    a, b = peer("198.18.2.1"), peer("198.18.2.3")
    try:
        for port in range(20):
            message(r, a, wire.CLIENT_ADD, 1000 + port)
        assert len(r.routes) == 16 and len(r.routes_of(a)) == 16
        assert CIP + (1000).to_bytes(2, "big") not in r.routes       # the oldest went
        for port in range(12):
            message(r, b, wire.CLIENT_ADD, 2000 + port)
        assert len(r.routes) == 24 and len(r.routes_of(b)) == 8
        assert count(cnt, "routes_over_limit") == 4 + 4
    finally:
        a.sock.close()
        b.sock.close()


def reply_from(source: bytes, port: int) -> bytes:
    from tcpcopyd.net import packet as P
    return wire.reply_header(P.build(source, CIP, 80, port, 1, 1, P.ACK, 100))


def test_a_reply_from_another_source_than_the_registered_target_is_dropped():
    cnt = [0] * len(IC.NAMES)
    r = Router(cnt)
    p = peer("198.18.2.1")
    try:
        message(r, p, wire.CLIENT_ADD, 40000)
        r.route(reply_from(socket.inet_aton("198.18.9.1"), 40000), 1.0)
        assert not p.pending and count(cnt, "replies_foreign") == 1
        r.route(reply_from(TIP, 40000), 1.0)
        assert len(p.pending) == 1
    finally:
        p.sock.close()


def test_a_full_delay_table_costs_a_bounded_round():
    class CountingTable:
        regions = 2
        finds = 0

        def find(self, key, skip=-1):
            CountingTable.finds += 1
            return None

    r = Router([0] * len(IC.NAMES))
    r.table = CountingTable()
    for port in range(10000):
        r.route(reply_from(TIP, port), 1.0)
    assert len(r.delayed) == 10000
    assert len(r.soon) == R.SOON_MAX                # early look-ups: bounded as well
    CountingTable.finds = 0
    r.retry_delayed(1.5)
    assert CountingTable.finds == R.DELAY_RETRY_BUDGET
    assert len(r.delayed) == 10000                 # still waiting, moved to the back
    for _ in range(10000 // R.DELAY_RETRY_BUDGET + 1):
        r.retry_delayed(10.0)                      # expired, a bounded share per round
    assert not r.delayed and r.n_delayed == 0


def test_a_reply_caught_before_another_worker_read_its_registration_follows_within_ms():
    class SharedTable:           # the shm route table: worker 1 registers port 7 later
        regions = 2
        held: dict = {}
        finds = 0

        def find(self, key, skip=-1):
            SharedTable.finds += 1
            return SharedTable.held.get(key)

    r = Router([0] * len(IC.NAMES))
    r.table = SharedTable()
    r.route(reply_from(TIP, 7), 1.0)                 # worker 1 has not read CLIENT_ADD yet
    r.route(reply_from(TIP, 8), 1.0)                 # a session nobody ever registers
    assert r.retry_soon(1.0) == 1.0 + R.RETRY_SOON[0] and not r.outbox
    SharedTable.held[R.route_key(CIP, 7)] = (1, 0)   # now it has
    r.retry_soon(1.0 + R.RETRY_SOON[0])
    assert r.outbox == {1: [reply_from(TIP, 7)]}     # handed over 1 ms after, not 0.1 s
    assert list(r.delayed) == [R.route_key(CIP, 8)] and r.n_delayed == 1
    # the other is looked up a few times only, then left to the rounds (bounded work)
    SharedTable.finds = 0
    t = 1.0
    while (t := r.retry_soon(t)):
        pass
    assert SharedTable.finds == len(R.RETRY_SOON) - 1 and not r.soon
    assert list(r.delayed) == [R.route_key(CIP, 8)]


def test_unsent_replies_are_bounded_per_worker_not_only_per_connection():
    from interceptd import counters as IC
    from interceptd.control import Peer
    from interceptd.router import WORKER_MAX_PENDING, Router
    cnt = [0] * len(IC.NAMES)
    r = Router(cnt)
    peers = []
    try:
        batch = [bytes(64)] * 20000          # about 1.3 MB once framed
        for i in range(12):   # readers that never read, each under its own 4 MiB
            p = Peer(socket.socket(), f"p{i}", i, bytes([10, 0, 0, i]))
            p.out += bytes(5 << 19)           # 2.5 MiB: 30 MiB in all
            p.pending.extend(batch)
            peers.append(p)
        room = WORKER_MAX_PENDING - sum(len(p.out) for p in peers)
        for p in peers:
            before = len(p.out)
            r.frame(p, room)
            room -= len(p.out) - before
        # without the worker's bound: 30 + 12 x 1.3 MB
        assert sum(len(p.out) for p in peers) <= WORKER_MAX_PENDING + 1_400_000
        assert cnt[IC.INDEX["slow_peer_dropped"]] > 0
    finally:
        for p in peers:
            p.sock.close()


@pytest.mark.parametrize("secrets,state,words", [
    ((SECRET, SECRET), "accepted", "shared secret proved both ways"),
    ((None, None), "accepted", "protocol version 6"),
    ((None, SECRET), "unwelcome", "has no shared secret"),
    ((SECRET, b"another secret of 16+ bytes"), "unwelcome", "wrong proof of the shared secret"),
    ((SECRET, None), "unwelcome", "refused us, 127.0.0.1: it wants the shared secret"),
], ids=["both", "neither", "only the doctor", "different", "only interceptd"])
def test_the_doctor_goes_through_the_handshake_as_tcpcopyd_would(server, secrets, state,
                                                                 words):
    import threading

    from tcpcopyd.ctl.doctor import version_probe
    srv = server(secret=secrets[0])
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            srv.pump(1)
    t = threading.Thread(target=serve)
    t.start()
    try:
        got, detail = version_probe("127.0.0.1", srv.port, secrets[1])
    finally:
        stop.set()
        t.join()
    assert got == state and words in detail, detail


def test_a_turn_reads_a_bounded_share_of_the_registrations_each_connection_in_turn(server):
    from interceptd import control as IControl
    from interceptd import loop as W
    srv = server()
    flood = [client(srv, wire.version_message()) for _ in range(3)]
    for i, c in enumerate(flood):
        c.sendall(b"".join(add(10000 * i + p) for p in range(3000)))   # 60 000 bytes each
    served: list[tuple[int, int]] = []

    def on_event(fd: int, ev: int, now: float) -> int:
        got = srv.control.on_event(fd, ev, now)
        served.append((fd, got))
        return got
    deadline = time.monotonic() + 10
    firsts = []
    for turn in range(1, 40):
        events = [(fd, ev) for fd, ev in srv.ep.poll(1)
                  if fd != srv.control.listen_fd]
        if not events:
            break
        served.clear()
        W.serve_control(events, on_event, turn, time.monotonic())
        assert sum(got for _, got in served) < W.CONTROL_TURN + IControl.RECV_SIZE
        firsts.append(served[0][0])
        assert time.monotonic() < deadline
    # all of it read, and no connection was first twice running while three had input
    assert count(srv.counters, "client_add") == 9000
    assert len(set(firsts[:3])) == 3, firsts
    for c in flood:
        c.close()


def test_replies_a_slow_reader_left_unsent_leave_when_it_reads_and_the_watch_ends(server):
    """A send that leaves bytes behind has the connection watched for room (EPOLLOUT), so
    the rest leaves when the reader makes room, not at whatever turn another event brings;
    once all went the watch ends (a socket with room would wake every turn)."""
    srv = server()
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.connect(("127.0.0.1", srv.port))
    c.settimeout(2)
    c.sendall(wire.version_message() + add(40000))
    srv.pump()
    (fd, peer), = srv.control.peers.items()
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    now = time.monotonic()
    for _ in range(3000):
        srv.router.route(reply_from(TIP, 40000), now)
    srv.control.flush()
    assert peer.out, "the reader's buffers took everything: the test needs more replies"
    got = 0
    while peer.out or got == 0:
        got += len(c.recv(1 << 16))
        events = dict(srv.ep.poll(1.0))
        assert events.get(fd, 0) & select.EPOLLOUT, "room made, the connection not watched"
        srv.control.on_event(fd, events[fd], time.monotonic())
    assert not srv.ep.poll(0.05), "all sent, still watched for room"
