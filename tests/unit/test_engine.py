"""The session engine against a scripted target: packets in, packets out, no sockets."""
import socket

import pytest

from tcpcopyd.net import packet as P
from tcpcopyd.net import wire
from tcpcopyd.online import counters as C
from tcpcopyd.online.engine import SEGMENT_COST, Engine
from tcpcopyd.online.session import ESTABLISHED, FAKE, TIMESTAMPS

CLIENT = socket.inet_aton("198.18.1.1")
ONLINE = socket.inet_aton("198.18.1.2")
TARGET = socket.inet_aton("198.18.2.2")
CPORT = 40000
ISN = 1000
ONLINE_ISN = 5_000_000
TARGET_ISN = 9_000_000


class FakeSender:
    def __init__(self):
        self.sent: list[P.Packet] = []

    def send(self, pkt, dst):
        assert dst == TARGET
        self.sent.append(P.parse(bytes(pkt)))
        return True

    def take(self):
        out, self.sent = self.sent, []
        return out


class FakeControl:
    up = True

    def __init__(self):
        self.log = []

    def register(self, s):
        self.log.append(("add", s.client_port))

    def unregister(self, s):
        self.log.append(("del", s.client_port))

    def flush(self, now):
        self.log.append(("flush",))

    def carries(self, s):
        return self.up


def client_pkt(seq, ack, flags, payload=b"", options=b"", window=502):
    return P.build(CLIENT, ONLINE, CPORT, 80, seq, ack, flags, window, options, payload)


def reply(seq, ack, flags, payload_len=0, window=65535, options=b""):
    pkt = P.build(TARGET, CLIENT, 80, CPORT, seq, ack, flags, window, options,
                  bytes(payload_len))
    return wire.reply_header(pkt)


SYN_OPTS = P.syn_options(1460, 7, True, (777, 0))
SYNACK_OPTS = P.syn_options(1460, 7, True, (3333, 777))


@pytest.fixture
def eng():
    e = Engine({80: (TARGET, 80)}, FakeSender(), FakeControl(), None, range(100))
    return e


def feed(e, pkt, now=100.0):
    e.on_client_packet(pkt, len(pkt), now)
    e.flush(now)


def answer(e, hdr, now=100.0):
    e.on_reply(hdr, now)
    e.flush(now)


def handshake(e, now=100.0):
    feed(e, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS, window=64240), now)
    answer(e, reply(TARGET_ISN, ISN + 1, P.SYN | P.ACK, options=SYNACK_OPTS), now)
    return e.sessions[(CLIENT, CPORT, TARGET, 80)]


def test_syn_is_rewritten_and_registered_first(eng):
    feed(eng, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS, window=64240))
    assert eng.control.log[:2] == [("add", CPORT), ("flush",)]
    [syn] = eng.sender.take()
    assert (syn.src, syn.dst, syn.sport, syn.dport) == (CLIENT, TARGET, CPORT, 80)
    assert syn.flags == P.SYN and syn.seq == ISN and syn.options == SYN_OPTS


def test_handshake_completes_from_the_targets_syn_ack(eng):
    s = handshake(eng)
    assert len(eng.sender.take()) == 1  # the SYN; the third ACK waits for data a moment
    eng.tick(100.0 + 0.05)
    [ack] = eng.sender.take()
    assert ack.flags == P.ACK and ack.seq == ISN + 1 and ack.ack == TARGET_ISN + 1
    assert s.state & ESTABLISHED and s.state & TIMESTAMPS
    assert s.wscale == 7
    # TSecr of what we send is the target's TSval, never the online server's
    assert P.timestamp_of(ack.options) == (777, 3333)


def test_data_acks_the_target_sequence_space_not_the_online_one(eng):
    handshake(eng)
    eng.sender.take()
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"GET / HTTP/1.1\r\n\r\n"))
    [data] = eng.sender.take()
    assert data.seq == ISN + 1
    assert data.ack == TARGET_ISN + 1
    assert data.payload == b"GET / HTTP/1.1\r\n\r\n"


def test_data_before_the_syn_ack_waits_for_the_handshake(eng):
    feed(eng, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS))
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"hello"))
    assert len(eng.sender.take()) == 1  # only the SYN
    answer(eng, reply(TARGET_ISN, ISN + 1, P.SYN | P.ACK, options=SYNACK_OPTS))
    [data] = eng.sender.take()  # the handshake ACK rides on the data
    assert data.payload == b"hello" and data.ack == TARGET_ISN + 1


def test_next_request_waits_for_the_targets_response(eng):
    handshake(eng)
    eng.sender.take()
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"req1"))
    # the client got the online response (its ACK moved) and sends request 2
    feed(eng, client_pkt(ISN + 5, ONLINE_ISN + 101, P.ACK | P.PSH, b"req2"))
    assert [p.payload for p in eng.sender.take()] == [b"req1"]
    assert eng.counters[C.INDEX["paced"]] >= 1
    # the target acknowledges and answers request 1
    answer(eng, reply(TARGET_ISN + 1, ISN + 5, P.ACK | P.PSH, payload_len=50))
    out = eng.sender.take()
    assert [p.payload for p in out] == [b"req2"]
    assert out[0].ack == TARGET_ISN + 51


def test_paced_request_goes_anyway_after_the_pace_timeout(eng):
    handshake(eng)
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"req1"))
    feed(eng, client_pkt(ISN + 5, ONLINE_ISN + 101, P.ACK | P.PSH, b"req2"))
    eng.sender.take()
    answer(eng, reply(TARGET_ISN + 1, ISN + 5, P.ACK))  # acked, but no answer
    eng.tick(100.0 + eng.pace_timeout + 0.01)
    assert [p.payload for p in eng.sender.take()] == [b"req2"]


def test_retransmits_unacknowledged_data_on_timeout(eng):
    handshake(eng)
    eng.sender.take()
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"x" * 100))
    eng.sender.take()
    eng.tick(100.0 + 5)
    [again] = eng.sender.take()
    assert again.seq == ISN + 1 and again.payload == b"x" * 100
    assert eng.counters[C.INDEX["retransmits"]] == 1


def test_fast_retransmit_after_three_duplicate_acks(eng):
    handshake(eng)
    for i in range(4):
        feed(eng, client_pkt(ISN + 1 + i * 1000, ONLINE_ISN + 1, P.ACK, b"y" * 1000))
    eng.sender.take()
    for _ in range(4):  # one ACK that advances, then three duplicates
        answer(eng, reply(TARGET_ISN + 1, ISN + 1001, P.ACK))
    out = eng.sender.take()
    assert [p.seq for p in out if p.payload] == [ISN + 1001]
    assert eng.counters[C.INDEX["fast_retransmits"]] == 1


def test_never_sends_beyond_the_targets_window(eng):
    feed(eng, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS))
    # window field 10 with scale 7 = 1280 bytes
    answer(eng, reply(TARGET_ISN, ISN + 1, P.SYN | P.ACK, window=10, options=SYNACK_OPTS))
    eng.sender.take()
    s = eng.sessions[(CLIENT, CPORT, TARGET, 80)]
    s.wnd = 1280  # the SYN-ACK's window is never scaled; later ACKs are
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK, b"z" * 4000))
    sent = sum(len(p.payload) for p in eng.sender.take())
    assert sent == 1280
    acked = ISN + 1 + 1280
    while acked != ISN + 1 + 4000:  # each ACK opens 2560 bytes beyond what it acknowledges
        answer(eng, reply(TARGET_ISN + 1, acked, P.ACK, window=20))
        out = eng.sender.take()
        assert out and all(P.seq_le(p.seq + len(p.payload), acked + 2560) for p in out)
        acked = max(p.seq + len(p.payload) for p in out)


def test_large_captured_frames_are_cut_to_the_mss(eng):
    eng.mtu = 1000
    handshake(eng)
    eng.sender.take()
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK, b"q" * 5000))
    sizes = [len(p.payload) for p in eng.sender.take()]
    assert sum(sizes) == 5000 and max(sizes) <= 1000 - 40 - 12


def test_fake_syn_for_a_session_seen_mid_connection(eng):
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"GET /",
                         options=P.timestamp_option(50, 60)))
    [syn] = eng.sender.take()
    assert syn.flags == P.SYN and syn.seq == ISN
    assert int.from_bytes(P.parse_options(syn.options)[P.OPT_MSS], "big") == 1460
    s = eng.sessions[(CLIENT, CPORT, TARGET, 80)]
    assert s.state & FAKE
    answer(eng, reply(TARGET_ISN, ISN + 1, P.SYN | P.ACK, options=SYNACK_OPTS))
    [data] = eng.sender.take()  # the fake third ACK carries the data
    assert data.payload == b"GET /" and data.ack == TARGET_ISN + 1
    assert eng.counters[C.INDEX["sessions_fake"]] == 1


def test_client_closes_first_then_a_reset_frees_the_target(eng):
    handshake(eng)
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"req"))
    answer(eng, reply(TARGET_ISN + 1, ISN + 4, P.ACK | P.PSH, payload_len=10))
    feed(eng, client_pkt(ISN + 4, ONLINE_ISN + 11, P.ACK | P.FIN))
    # the FIN waits until the target has been quiet for a moment (its answer is complete)
    assert not [p for p in eng.sender.take() if p.flags & P.FIN]
    eng.tick(100.0 + 1.5)
    [fin] = [p for p in eng.sender.take() if p.flags & P.FIN]
    assert fin.seq == ISN + 4 and fin.ack == TARGET_ISN + 11
    answer(eng, reply(TARGET_ISN + 11, ISN + 5, P.ACK | P.FIN))
    [rst] = eng.sender.take()
    assert rst.flags & P.RST and rst.seq == ISN + 5
    assert not eng.sessions
    assert ("del", CPORT) in eng.control.log
    assert eng.counters[C.INDEX["sessions_closed"]] == 1


def test_target_closes_first_then_the_clients_fin_becomes_a_reset(eng):
    handshake(eng)
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"req"))
    answer(eng, reply(TARGET_ISN + 1, ISN + 4, P.ACK | P.PSH | P.FIN, payload_len=10))
    eng.sender.take()
    feed(eng, client_pkt(ISN + 4, ONLINE_ISN + 12, P.ACK | P.FIN))
    [rst] = eng.sender.take()  # no FIN, no separate ACK: one reset at the FIN's place
    assert rst.flags & P.RST and rst.seq == ISN + 4
    assert not eng.sessions
    assert eng.counters[C.INDEX["sessions_closed"]] == 1


def test_target_data_is_acknowledged_every_second_segment_or_after_a_delay(eng):
    handshake(eng)
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"GET /big"))
    eng.sender.take()
    answer(eng, reply(TARGET_ISN + 1, ISN + 9, P.ACK, payload_len=1000))
    assert eng.sender.take() == []
    answer(eng, reply(TARGET_ISN + 1001, ISN + 9, P.ACK, payload_len=1000))
    [ack] = eng.sender.take()
    assert ack.ack == TARGET_ISN + 2001
    answer(eng, reply(TARGET_ISN + 2001, ISN + 9, P.ACK, payload_len=500))
    eng.tick(100.0 + 0.05)
    [ack] = eng.sender.take()
    assert ack.ack == TARGET_ISN + 2501


def test_client_reset_still_delivers_queued_data(eng):
    feed(eng, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS))
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"last words"))
    feed(eng, client_pkt(ISN + 11, ONLINE_ISN + 1, P.RST | P.ACK))
    assert eng.sessions  # not yet: the data has not reached the target
    answer(eng, reply(TARGET_ISN, ISN + 1, P.SYN | P.ACK, options=SYNACK_OPTS))
    assert [p.payload for p in eng.sender.take() if p.payload] == [b"last words"]
    answer(eng, reply(TARGET_ISN + 1, ISN + 11, P.ACK))
    assert eng.sender.take()[-1].flags & P.RST
    assert not eng.sessions


def test_target_reset_ends_the_session(eng):
    handshake(eng)
    answer(eng, reply(TARGET_ISN + 1, ISN + 1, P.RST | P.ACK))
    assert not eng.sessions
    assert eng.counters[C.INDEX["sessions_target_rst"]] == 1


def test_client_retransmissions_and_reordering_are_repaired(eng):
    handshake(eng)
    eng.sender.take()
    feed(eng, client_pkt(ISN + 11, ONLINE_ISN + 1, P.ACK, b"B" * 10))  # ahead of a gap
    assert not [p for p in eng.sender.take() if p.payload]
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK, b"A" * 10))
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK, b"A" * 10))  # duplicate
    out = [p for p in eng.sender.take() if p.payload]
    assert [(p.seq, p.payload) for p in out] == [(ISN + 1, b"A" * 10), (ISN + 11, b"B" * 10)]
    assert eng.counters[C.INDEX["duplicate"]] == 1


def test_unfilled_capture_gap_breaks_the_session_instead_of_hanging(eng):
    handshake(eng)
    feed(eng, client_pkt(ISN + 11, ONLINE_ISN + 1, P.ACK, b"B" * 10))
    eng.tick(100.0 + 6)
    assert not eng.sessions
    assert eng.counters[C.INDEX["sessions_broken"]] == 1


def test_idle_sessions_expire_with_a_reset(eng):
    handshake(eng)
    eng.sender.take()
    eng.expire_idle(100.0 + eng.idle_timeout + 1)
    assert not eng.sessions
    assert eng.sender.take()[-1].flags & P.RST
    assert eng.counters[C.INDEX["sessions_expired"]] == 1


def test_new_syn_on_a_reused_client_port_replaces_the_session(eng):
    handshake(eng)
    eng.sender.take()
    feed(eng, client_pkt(ISN + 50000, 0, P.SYN, options=SYN_OPTS))
    out = eng.sender.take()
    assert out[0].flags & P.RST and out[1].flags == P.SYN and out[1].seq == ISN + 50000
    assert eng.counters[C.INDEX["sessions_reused"]] == 1


@pytest.mark.parametrize("junk", [b"", b"\x45" * 10, b"\x60" + bytes(59),
                                  bytes.fromhex("450000280000400040110000") + bytes(28)])
def test_malformed_captured_packets_are_counted_and_skipped(eng, junk):
    eng.on_client_packet(junk, len(junk), 100.0)
    # (an IPv6 header of zeros: a chain of hop-by-hop headers, cut short)
    assert eng.counters[C.INDEX["not_followed" if junk[:1] == b"\x60" else "malformed"]] == 1
    assert not eng.sessions


def test_malformed_and_foreign_replies_are_counted(eng):
    eng.on_reply(bytes(64), 100.0)
    assert eng.counters[C.INDEX["replies_malformed"]] == 1
    eng.on_reply(reply(1, 1, P.ACK), 100.0)
    assert eng.counters[C.INDEX["replies_no_session"]] == 1


def test_client_fin_after_an_answer_waits_for_the_targets_answer(eng):
    handshake(eng)
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"POST"))
    # the online server answered; the client acknowledges it and closes
    feed(eng, client_pkt(ISN + 5, ONLINE_ISN + 100, P.ACK | P.FIN))
    assert not [p for p in eng.sender.take() if p.flags & P.FIN]
    answer(eng, reply(TARGET_ISN + 1, ISN + 5, P.ACK | P.PSH, payload_len=20))
    answer(eng, reply(TARGET_ISN + 21, ISN + 5, P.ACK | P.PSH, payload_len=20), now=100.5)
    eng.tick(101.0)
    assert not [p for p in eng.sender.take() if p.flags & P.FIN]  # still answering
    eng.tick(101.6)
    [fin] = [p for p in eng.sender.take() if p.flags & P.FIN]
    assert fin.seq == ISN + 5


def test_rules_bound_to_an_online_address_copy_only_that_address():
    other = socket.inet_aton("198.18.1.3")
    e = Engine({(ONLINE, 80): (TARGET, 80), (other, 80): (TARGET, 8080)}, FakeSender(),
               FakeControl(), None, range(10))
    feed(e, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS))
    [syn] = e.sender.take()
    assert syn.dport == 80
    pkt = P.build(CLIENT, socket.inet_aton("198.18.1.9"), CPORT + 1, 80, ISN, 0, P.SYN, 5)
    feed(e, pkt)
    assert e.sender.take() == []
    assert e.counters[C.NO_SESSION] == 1


def worker_engine(table) -> Engine:
    """The engine of a worker that owns the 16 slots of ``table``."""
    return Engine({80: (TARGET, 80)}, FakeSender(), FakeControl(), table, range(16))


def test_a_new_worker_carries_sessions_on_from_the_shm_table(slot_table):
    table = slot_table
    old = worker_engine(table)
    handshake(old)
    feed(old, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"req1"))
    answer(old, reply(TARGET_ISN + 1, ISN + 5, P.ACK | P.PSH, payload_len=30))
    old.sync_table()
    # the old worker dies; a new one reads the table
    new = worker_engine(table)
    assert new.restore(200.0) == 1
    feed(new, client_pkt(ISN + 5, ONLINE_ISN + 100, P.ACK | P.PSH, b"req2"))
    [data] = new.sender.take()
    assert (data.seq, data.ack, data.payload) == (ISN + 5, TARGET_ISN + 31, b"req2")
    assert P.timestamp_of(data.options) == (777, 3333)
    # a session whose next data is missing (the old worker had it) is reopened there
    new.sync_table()
    newer = worker_engine(table)
    assert newer.restore(300.0) == 1
    feed(newer, client_pkt(ISN + 20, ONLINE_ISN + 300, P.ACK | P.PSH, b"req4"))
    rst, syn = newer.sender.take()
    assert rst.flags & P.RST and syn.flags == P.SYN and syn.seq == ISN + 19
    assert newer.counters[C.INDEX["sessions_resynced"]] == 1


def test_a_request_the_dead_worker_captured_but_never_sent_is_not_skipped_over(slot_table):
    table = slot_table
    old = worker_engine(table)
    handshake(old)
    feed(old, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"req1"))
    # the next request waits for the target's answer to the first (paced) ...
    feed(old, client_pkt(ISN + 5, ONLINE_ISN + 100, P.ACK | P.PSH, b"req2"))
    assert [p.payload for p in old.sender.take() if p.payload] == [b"req1"]
    answer(old, reply(TARGET_ISN + 1, ISN + 5, P.ACK))
    old.sync_table()
    # ... when the worker dies: req2 is gone with it. The next request must not go
    # out after a hole the target would wait on forever: the session starts afresh
    new = worker_engine(table)
    assert new.restore(200.0) == 1
    feed(new, client_pkt(ISN + 9, ONLINE_ISN + 200, P.ACK | P.PSH, b"req3"), 200.0)
    rst, syn = new.sender.take()
    assert rst.flags & P.RST and syn.flags == P.SYN and syn.seq == ISN + 8
    assert new.counters[C.INDEX["sessions_resynced"]] == 1


def test_a_slot_torn_by_a_killed_worker_is_a_lost_session_not_a_crash(slot_table):
    from shm import seqlock
    from tcpcopyd.online.session import SLOT
    table, seg = slot_table, slot_table.seg
    old = worker_engine(table)
    handshake(old)
    for port in (CPORT + 1, CPORT + 2):
        feed(old, P.build(CLIENT, ONLINE, port, 80, ISN, 0, P.SYN, 100, SYN_OPTS))
    old.sync_table()
    # the old worker is killed in the middle of writing one slot: its counter stays odd
    torn = old.sessions[(CLIENT, CPORT + 1, TARGET, 80)].slot
    off = seg.slot_offset(torn)
    seqlock.SEQ.pack_into(seg.mm, off, seqlock.SEQ.unpack_from(seg.mm, off)[0] + 1)
    new = worker_engine(table)
    assert new.restore(200.0) == 2
    assert new.counters[C.INDEX["sessions_torn"]] == 1
    assert sorted(s.client_port for s in new.sessions.values()) == [CPORT, CPORT + 2]
    assert table.read(torn) == SLOT.empty()          # cleared, free again
    assert torn in new.free_slots


def test_a_full_session_table_evicts_the_oldest_idle_session():
    e = Engine({80: (TARGET, 80)}, FakeSender(), FakeControl(), None, range(2))
    for i, now in enumerate((10.0, 20.0, 30.0)):
        pkt = P.build(CLIENT, ONLINE, CPORT + i, 80, ISN, 0, P.SYN, 100, SYN_OPTS)
        feed(e, pkt, now)
    assert sorted(s.client_port for s in e.sessions.values()) == [CPORT + 1, CPORT + 2]
    assert e.counters[C.INDEX["sessions_evicted"]] == 1


def test_a_refused_handshake_ack_starts_the_handshake_again(eng):
    feed(eng, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS))
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"GET /"))
    # an old SYN-ACK (the target has replaced that half-open connection since)
    answer(eng, reply(TARGET_ISN, ISN + 1, P.SYN | P.ACK, options=SYNACK_OPTS))
    eng.sender.take()
    answer(eng, reply(TARGET_ISN + 1, 0, P.RST))       # "bad ACK" reset, no ACK flag
    [syn] = eng.sender.take()
    assert syn.flags == P.SYN and syn.seq == ISN
    assert eng.counters[C.INDEX["handshake_restarts"]] == 1
    answer(eng, reply(TARGET_ISN + 5000, ISN + 1, P.SYN | P.ACK, options=SYNACK_OPTS))
    [data] = eng.sender.take()
    assert (data.seq, data.ack, data.payload) == (ISN + 1, TARGET_ISN + 5001, b"GET /")


def test_the_total_buffer_limit_resets_the_session_that_grows_past_it():
    e = Engine({80: (TARGET, 80)}, FakeSender(), FakeControl(), None, range(10),
               max_total_buffer=5000)
    for i in range(2):
        feed(e, P.build(CLIENT, ONLINE, CPORT + i, 80, ISN, 0, P.SYN, 100, SYN_OPTS))
        # no SYN-ACK: the data stays buffered
        feed(e, P.build(CLIENT, ONLINE, CPORT + i, 80, ISN + 1, ONLINE_ISN, P.ACK, 100, b"",
                        b"d" * 3000))
    assert [s.client_port for s in e.sessions.values()] == [CPORT]
    assert e.counters[C.INDEX["sessions_overflow"]] == 1
    assert e.buffered_total == 3000 + SEGMENT_COST     # what a held segment costs, counted


def test_a_zero_window_is_probed(eng):
    handshake(eng)
    eng.sender.take()
    answer(eng, reply(TARGET_ISN + 1, ISN + 1, P.ACK, window=0))  # the target is full
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"q" * 100))
    assert not [p for p in eng.sender.take() if p.payload]
    eng.tick(100.0 + 5)
    [probe] = [p for p in eng.sender.take() if p.payload]
    assert probe.seq == ISN + 1 and len(probe.payload) == 1
    answer(eng, reply(TARGET_ISN + 1, ISN + 2, P.ACK, window=100), now=106.0)  # open again
    assert [len(p.payload) for p in eng.sender.take() if p.payload] == [99]


def test_only_syn_leaves_out_sessions_seen_mid_connection():
    e = Engine({80: (TARGET, 80)}, FakeSender(), FakeControl(), None, range(10), only_syn=True)
    feed(e, client_pkt(ISN + 1, ONLINE_ISN, P.ACK | P.PSH, b"GET / HTTP/1.1\r\n\r\n"))
    assert not e.sessions and not e.sender.take()
    assert e.counters[C.INDEX["not_from_syn"]] == 1
    handshake(e)
    assert len(e.sessions) == 1


def test_assumed_rtt_sets_the_first_retransmission_timeout():
    e = Engine({80: (TARGET, 80)}, FakeSender(), FakeControl(), None, range(10),
               initial_rtt=0.1)
    feed(e, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS))
    e.sender.take()
    e.tick(100.0 + 0.29)
    assert not e.sender.take()
    e.tick(100.0 + 0.31)
    [syn] = e.sender.take()
    assert syn.flags == P.SYN   # sent again after 3 x 100 ms, not after 1 s


def test_keepalive_timeout_ends_quiet_sessions_sooner_than_busy_ones():
    e = Engine({80: (TARGET, 80)}, FakeSender(), FakeControl(), None, range(10),
               idle_timeout=120, keepalive_timeout=10)
    s = handshake(e)
    e.expire_idle(100.0 + 5)
    assert e.sessions
    s.awaiting = True            # a request the target has not answered yet: -t applies
    e.expire_idle(100.0 + 11)
    assert e.sessions
    s.awaiting = False           # between requests: -k applies
    e.expire_idle(100.0 + 11)
    assert not e.sessions


def test_memory_cap_refuses_new_sessions_and_resets_the_one_that_grows_past_it():
    e = Engine({80: (TARGET, 80)}, FakeSender(), FakeControl(), None, range(10),
               max_memory=4000)
    feed(e, P.build(CLIENT, ONLINE, CPORT, 80, ISN, 0, P.SYN, 100, SYN_OPTS))
    feed(e, P.build(CLIENT, ONLINE, CPORT, 80, ISN + 1, ONLINE_ISN, P.ACK, 100, b"",
                    b"d" * 3400))                        # past 7/8 of -m
    feed(e, P.build(CLIENT, ONLINE, CPORT + 1, 80, ISN, 0, P.SYN, 100, SYN_OPTS))
    assert [s.client_port for s in e.sessions.values()] == [CPORT]
    assert e.counters[C.INDEX["sessions_refused"]] == 1
    assert e.sessions[(CLIENT, CPORT, TARGET, 80)].buffered == 3400 + SEGMENT_COST
    feed(e, P.build(CLIENT, ONLINE, CPORT, 80, ISN + 3401, ONLINE_ISN, P.ACK, 100, b"",
                    b"e" * 1000))                        # past -m: it cannot be whole
    assert e.counters[C.INDEX["sessions_overflow"]] == 1
    assert not e.sessions and e.buffered_total == 0


def test_several_connections_per_interceptd_give_a_session_always_the_same_one():
    import select

    from tcpcopyd.online.control import ControlGroup
    from tcpcopyd.online.session import Session
    ep = select.epoll()
    g = ControlGroup([("198.18.2.3", 36524), ("198.18.2.4", 36524)], ep, per_server=3)
    for link in g.links:
        link.up = True
    s = Session((CLIENT, 40001, TARGET, 80), CLIENT, 40001, TARGET, 80, 0, 100.0)
    g.register(s)
    g.unregister(s)
    used = [(link.host, i % 3) for i, link in enumerate(g.links) if link.out]
    assert used == [("198.18.2.3", 40001 % 3), ("198.18.2.4", 40001 % 3)]
    assert all(len(link.out) == 2 * wire.CLIENT_MSG_SIZE for link in g.links if link.out)
    ep.close()


def test_a_session_is_registered_with_the_interceptd_of_its_target_if_any():
    import select

    from tcpcopyd.online.control import ControlGroup
    from tcpcopyd.online.session import Session
    ep = select.epoll()
    g = ControlGroup([("198.18.2.2", 36524), ("198.18.2.3", 36524)], ep)
    for link in g.links:
        link.up = True
    g.register(Session((CLIENT, 40001, TARGET, 80), CLIENT, 40001, TARGET, 80, 0, 100.0))
    assert [bool(link.out) for link in g.links] == [True, False]
    other = socket.inet_aton("198.18.9.9")   # no interceptd there: all of them
    g.register(Session((CLIENT, 40002, other, 80), CLIENT, 40002, other, 80, 1, 100.0))
    assert [len(link.out) // wire.CLIENT_MSG_SIZE for link in g.links] == [2, 1]
    ep.close()


def test_loopback_clients_get_the_localhost_address():
    from tcpcopyd.online.rewrite import LOOPBACK, Rewrite
    rw = Rewrite(localhost_as=socket.inet_aton("198.18.1.9"))
    assert rw.address(LOOPBACK) == socket.inet_aton("198.18.1.9")
    assert rw.address(CLIENT) == CLIENT


def test_port_classes_of_workers_and_blocks_never_overlap():
    from tcpcopyd.online.rewrite import Rewrite
    classes = []
    for block in (0, 1, 7):
        for worker in range(3):
            rw = Rewrite(2, block, worker=worker, workers=3)
            taken: set[int] = set()
            ports = set()
            for _ in range(rw.count):
                p = rw.port(CLIENT, taken.__contains__)
                taken.add(p)
                ports.add(p)
            assert rw.port(CLIENT, taken.__contains__) is None   # full: refused
            assert min(ports) >= 1024 and max(ports) <= 65535
            classes.append(ports)
    for i, a in enumerate(classes):
        for b in classes[i + 1:]:
            assert not a & b


def test_freed_ports_are_not_handed_out_again_at_once():
    from tcpcopyd.online.rewrite import Rewrite
    rw = Rewrite(1, 0)
    first = rw.port(CLIENT, lambda p: False)
    assert rw.port(CLIENT, lambda p: False) != first


def copies_engine(**kw):
    from tcpcopyd.online.rewrite import Rewrite
    return Engine({80: (TARGET, 80)}, FakeSender(), FakeControl(), None, range(30),
                  rewrite=Rewrite(**kw))


def test_three_copies_of_a_session_each_complete_on_its_own_port():
    e = copies_engine(copies=3, block=2)
    feed(e, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS, window=64240))
    syns = e.sender.take()
    ports = [p.sport for p in syns]
    assert len(set(ports)) == 3 and all(p.flags == P.SYN and p.src == CLIENT for p in syns)
    assert all(1024 + 2 * 8064 <= p < 1024 + 3 * 8064 for p in ports)
    for i, port in enumerate(ports):
        hdr = wire.reply_header(P.build(TARGET, CLIENT, 80, port, TARGET_ISN + i, ISN + 1,
                                        P.SYN | P.ACK, 65535, SYNACK_OPTS))
        answer(e, hdr)
    feed(e, client_pkt(ISN + 1, ONLINE_ISN, P.ACK | P.PSH, b"GET / HTTP/1.1\r\n\r\n"))
    data = [p for p in e.sender.take() if p.payload]
    assert sorted((p.sport, p.ack) for p in data) == sorted(
        (port, TARGET_ISN + i + 1) for i, port in enumerate(ports))
    assert len(e.copies_of) == 1
    for i, port in enumerate(ports):
        answer(e, wire.reply_header(P.build(TARGET, CLIENT, 80, port, TARGET_ISN + i + 1,
                                            ISN + 1, P.RST | P.ACK, 0)))
    assert not e.sessions and not e.copies_of


def test_client_pool_addresses_replace_the_client_and_leave_out_the_target():
    from tcpcopyd.online.rewrite import expand_pool
    pool = expand_pool(["198.18.2.x"], {"198.18.2.2"})
    assert len(pool) == 253 and TARGET not in pool
    e = copies_engine(pool=pool)
    feed(e, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS))
    [syn] = e.sender.take()
    assert syn.src in pool and syn.src != CLIENT
    assert e.control.log[0] == ("add", syn.sport)


def test_ramp_copies_one_percent_more_each_second_up_to_the_sample_rate():
    e = Engine({80: (TARGET, 80)}, FakeSender(), FakeControl(), None, range(10),
               sample_rate=50, ramp_from=100.0)
    assert [e.rate(100.0 + t) for t in (0, 0.5, 1, 9.9, 48, 49, 60)] == [1, 1, 2, 10, 49, 50,
                                                                          50]
    assert e.ramp_from is None    # done ramping: the plain -r check again


def test_a_reused_port_waits_while_the_previous_session_still_has_data_for_the_target(eng):
    handshake(eng)
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN, P.ACK | P.PSH, b"GET /old HTTP/1.1\r\n\r\n"))
    eng.sender.take()
    # the target has not acknowledged the request yet when the client reuses the port
    feed(eng, client_pkt(ISN + 90000, 0, P.SYN, options=SYN_OPTS))
    feed(eng, client_pkt(ISN + 90001, ONLINE_ISN, P.ACK | P.PSH, b"GET /new HTTP/1.1\r\n\r\n"))
    assert eng.sender.take() == []
    assert eng.counters[C.INDEX["port_reuse_held"]] == 1
    assert eng.counters[C.INDEX["sessions_reused"]] == 0
    # the previous session ends (here: the target resets it): the new one starts
    answer(eng, reply(TARGET_ISN + 1, ISN + 1, P.RST | P.ACK))
    eng.flush(100.0)
    [syn] = eng.sender.take()
    assert syn.flags == P.SYN and syn.seq == ISN + 90000
    s = eng.sessions[(CLIENT, CPORT, TARGET, 80)]
    assert s.isn == ISN + 90000 and s.unsent and s.unsent[0].payload.startswith(b"GET /new")


def test_a_held_session_gives_up_waiting_after_a_while(eng):
    from tcpcopyd.online.portreuse import HOLD as REUSE_HOLD
    handshake(eng)
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN, P.ACK | P.PSH, b"GET /old HTTP/1.1\r\n\r\n"))
    feed(eng, client_pkt(ISN + 90000, 0, P.SYN, options=SYN_OPTS))
    eng.sender.take()
    eng.expire_idle(100.0 + REUSE_HOLD + 1)
    eng.flush(100.0 + REUSE_HOLD + 1)
    out = eng.sender.take()
    assert out[0].flags & P.RST and out[-1].flags == P.SYN and out[-1].seq == ISN + 90000
    assert eng.counters[C.INDEX["sessions_reused"]] == 1


def test_with_copies_a_reused_port_starts_new_copies_while_the_old_ones_finish():
    e = copies_engine(copies=2)
    feed(e, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS))
    old_ports = [p.sport for p in e.sender.take()]
    feed(e, client_pkt(ISN + 1, ONLINE_ISN, P.ACK | P.PSH, b"GET /old HTTP/1.1\r\n\r\n"))
    feed(e, client_pkt(ISN + 90000, 0, P.SYN, options=SYN_OPTS))
    syns = [p for p in e.sender.take() if p.flags == P.SYN]
    assert len(syns) == 2 and not {p.sport for p in syns} & set(old_ports)
    assert len(e.sessions) == 4          # the old copies still hold their request
    assert e.counters[C.INDEX["sessions_reused"]] == 0


def test_a_reset_from_the_target_side_counts_only_at_our_next_sequence_number(eng):
    s = handshake(eng)
    eng.sender.take()
    key = (CLIENT, CPORT, TARGET, 80)
    answer(eng, reply(TARGET_ISN + 1 + 10_000_000, ISN + 1, P.RST | P.ACK))   # far away
    assert key in eng.sessions and eng.sender.take() == []
    assert eng.counters[C.INDEX["resets_out_of_window"]] == 1
    answer(eng, reply(TARGET_ISN + 1 + 1000, ISN + 1, P.RST | P.ACK))         # in window
    [challenge] = eng.sender.take()
    assert challenge.flags == P.ACK and challenge.ack == s.rcv_nxt
    assert key in eng.sessions and eng.counters[C.INDEX["challenge_acks"]] == 1
    answer(eng, reply(TARGET_ISN + 1, ISN + 1, P.RST | P.ACK))                # exact
    assert key not in eng.sessions
    assert eng.counters[C.INDEX["sessions_target_rst"]] == 1


def test_before_the_handshake_only_a_reset_acknowledging_our_syn_counts(eng):
    feed(eng, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS))
    key = (CLIENT, CPORT, TARGET, 80)
    answer(eng, reply(0, ISN + 77, P.RST | P.ACK))
    assert key in eng.sessions and eng.counters[C.INDEX["resets_out_of_window"]] == 1
    answer(eng, reply(0, ISN + 1, P.RST | P.ACK))   # the target's port is closed
    assert key not in eng.sessions


def test_a_syn_that_meets_an_older_connection_resets_it_and_goes_again(eng):
    feed(eng, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS))
    eng.sender.take()
    # the target still has an older connection on this port: it answers our SYN with an
    # ACK of that connection (its rcv_nxt in the ack field)
    answer(eng, reply(TARGET_ISN + 500, P.seq_add(ISN, -7000), P.ACK))
    rst, syn = eng.sender.take()
    assert rst.flags == P.RST and rst.seq == P.seq_add(ISN, -7000)
    assert syn.flags == P.SYN and syn.seq == ISN
    assert eng.counters[C.INDEX["stale_connections_reset"]] == 1
    answer(eng, reply(TARGET_ISN, ISN + 1, P.SYN | P.ACK, options=SYNACK_OPTS))
    assert eng.sessions[(CLIENT, CPORT, TARGET, 80)].state & ESTABLISHED


def test_a_reopened_session_resets_an_older_connection_that_expects_its_next_byte(eng):
    # a session reopened with a fake SYN just before its data, where the target's older
    # connection already had everything before it: that one acknowledges exactly isn + 1
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"GET / HTTP/1.1\r\n\r\n"))
    [syn] = eng.sender.take()
    assert syn.flags == P.SYN and syn.seq == ISN
    answer(eng, reply(TARGET_ISN + 500, ISN + 1, P.ACK))
    rst, again = eng.sender.take()
    assert rst.flags == P.RST and rst.seq == ISN + 1
    assert again.flags == P.SYN and again.seq == ISN
    answer(eng, reply(TARGET_ISN, ISN + 1, P.SYN | P.ACK, options=SYNACK_OPTS))
    [data] = eng.sender.take()
    assert data.payload == b"GET / HTTP/1.1\r\n\r\n"


def test_out_of_order_data_is_held_in_order_and_bounded(eng):
    handshake(eng)
    eng.sender.take()
    eng.max_session_buffer = 64 << 10
    # client data far beyond anything the session could buffer: dropped, counted
    feed(eng, client_pkt(ISN + 1 + (1 << 20), ONLINE_ISN + 1, P.ACK, b"far"))
    assert not eng.sessions[(CLIENT, CPORT, TARGET, 80)].ooo
    assert eng.counters[C.INDEX["out_of_window"]] == 1
    # 200 segments held in reverse order, then the gap fills: all go out in order
    for i in reversed(range(1, 201)):
        feed(eng, client_pkt(ISN + 1 + 10 * i, ONLINE_ISN + 1, P.ACK, b"%09d|" % i))
    s = eng.sessions[(CLIENT, CPORT, TARGET, 80)]
    assert len(s.ooo) == 200 and s.buffered == 200 * (10 + SEGMENT_COST)
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK, b"000000000|"))
    assert s.ooo is None and s.cap_nxt == ISN + 1 + 2010
    sent = b"".join(p.payload for p in eng.sender.take())
    assert sent == b"".join(b"%09d|" % i for i in range(201))[:len(sent)]


def test_too_many_segments_out_of_order_reset_the_session(eng):
    from tcpcopyd.online import engine as E
    handshake(eng)
    for i in range(E.MAX_OUT_OF_ORDER + 1):
        feed(eng, client_pkt(ISN + 10 + i, ONLINE_ISN + 1, P.ACK, b"x"))
    assert not eng.sessions and eng.buffered_total == 0
    assert eng.counters[C.INDEX["sessions_overflow"]] == 1


def test_a_full_table_evicts_a_session_with_nothing_in_flight_before_one_with_data():
    e = Engine({80: (TARGET, 80)}, FakeSender(), FakeControl(), None, range(2))
    # the oldest session has a request in flight (no SYN-ACK yet: its data stays queued)
    feed(e, P.build(CLIENT, ONLINE, CPORT, 80, ISN, 0, P.SYN, 100, SYN_OPTS), 10.0)
    feed(e, P.build(CLIENT, ONLINE, CPORT, 80, ISN + 1, ONLINE_ISN, P.ACK, 100, b"",
                    b"GET /"), 10.0)
    feed(e, P.build(CLIENT, ONLINE, CPORT + 1, 80, ISN, 0, P.SYN, 100, SYN_OPTS), 20.0)
    feed(e, P.build(CLIENT, ONLINE, CPORT + 2, 80, ISN, 0, P.SYN, 100, SYN_OPTS), 30.0)
    assert sorted(s.client_port for s in e.sessions.values()) == [CPORT, CPORT + 2]
    feed(e, P.build(CLIENT, ONLINE, CPORT + 3, 80, ISN, 0, P.SYN, 100, SYN_OPTS), 40.0)
    assert sorted(s.client_port for s in e.sessions.values()) == [CPORT, CPORT + 3]
    assert e.counters[C.INDEX["sessions_evicted"]] == 2


def test_packets_held_for_a_reused_port_count_and_are_bounded(eng):
    handshake(eng)
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN, P.ACK | P.PSH, b"GET /old HTTP/1.1\r\n\r\n"))
    feed(eng, client_pkt(ISN + 90000, 0, P.SYN, options=SYN_OPTS))   # the port, reused
    assert eng.reuse.bytes == SEGMENT_COST
    eng.max_session_buffer = 3000 + 2 * SEGMENT_COST - 1   # the SYN and this, held: too much
    feed(eng, client_pkt(ISN + 90001, ONLINE_ISN, P.ACK, b"n" * 3000))
    # no room to wait: the old session is reset, the new one starts
    assert eng.counters[C.INDEX["sessions_reused"]] == 1
    eng.flush(100.0)
    assert eng.reuse.bytes == 0 and not eng.reuse
    assert eng.sessions[(CLIENT, CPORT, TARGET, 80)].isn == ISN + 90000


def test_at_the_worker_limit_data_held_beyond_a_gap_pays_before_in_order_data():
    e = Engine({80: (TARGET, 80)}, FakeSender(), FakeControl(), None, range(10),
               max_total_buffer=1 << 20)
    handshake(e)
    good = e.sessions[(CLIENT, CPORT, TARGET, 80)]
    # a forged session fills the worker with data beyond a gap it will never fill
    feed(e, P.build(CLIENT, ONLINE, CPORT + 1, 80, ISN, 0, P.ACK, 100, b"", b"x"))
    for i in range(1, 900):
        feed(e, P.build(CLIENT, ONLINE, CPORT + 1, 80, ISN + 10 + 1000 * i, 0, P.ACK, 100,
                        b"", b"y" * 1000))
    assert e.ooo_bytes > 900_000
    # the real session's request still fits: the gapped one is reset to make room
    feed(e, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"r" * 60_000))
    assert good.key in e.sessions and (CLIENT, CPORT + 1, TARGET, 80) not in e.sessions
    assert e.counters[C.INDEX["sessions_overflow"]] == 1 and e.ooo_bytes == 0


def test_no_syn_goes_out_while_no_interceptd_holds_the_registration(eng):
    """Fail-closed: the target's SYN-ACK would not be caught, so it is never provoked."""
    eng.control.up = False
    feed(eng, client_pkt(ISN, 0, P.SYN, options=SYN_OPTS, window=64240))
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"GET / HTTP/1.1\r\n\r\n"))
    eng.tick(100.0 + 1.5)                    # the retransmission timer too
    assert eng.sender.take() == []
    assert eng.counters[C.INDEX["held_no_link"]] >= 2
    eng.control.up = True
    eng.control.log.clear()
    eng.on_control_up(102.0)
    # the registration is written out before the SYN goes
    assert eng.control.log[:2] == [("add", CPORT), ("flush",)]
    [syn] = eng.sender.take()
    assert syn.flags == P.SYN and syn.seq == ISN


def test_a_fake_syn_waits_for_a_link_too(eng):
    eng.control.up = False
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"GET / HTTP/1.1\r\n\r\n"))
    assert eng.sender.take() == []
    assert eng.counters[C.INDEX["sessions_fake"]] == 1


def test_established_sessions_send_nothing_but_resets_while_the_link_is_down(eng):
    s = handshake(eng)
    eng.sender.take()
    eng.control.up = False
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"hello"))
    assert eng.sender.take() == []
    eng.close_all()
    [rst] = eng.sender.take()
    assert rst.flags & P.RST and not eng.sessions
    assert s.freed


def sack(left: int, right: int) -> bytes:
    return bytes((P.OPT_NOP, P.OPT_NOP, P.OPT_SACK, 10)) + left.to_bytes(4, "big") \
        + right.to_bytes(4, "big")


def test_every_hole_of_a_loss_is_sent_again_without_waiting_for_the_timer(eng):
    handshake(eng)
    eng.tick(100.0 + 0.05)
    eng.sender.take()
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK, b"d" * 10000))
    segs = eng.sender.take()
    assert len(segs) == 7
    starts = [p.seq for p in segs]
    # the target lost the second and the fifth; its duplicate ACKs report what it holds
    # beyond the first hole, its window shrinking as that data fills its buffer
    answer(eng, reply(TARGET_ISN + 1, starts[1], P.ACK, window=62000))
    for i, window in enumerate((60000, 58000, 56000)):
        opts = P.timestamp_option(3334 + i, 777) + sack(starts[2], starts[3] + 1448 * i)
        answer(eng, reply(TARGET_ISN + 1, starts[1], P.ACK, window=window, options=opts))
    [again] = eng.sender.take()
    assert again.seq == starts[1]
    # the hole filled, the target acknowledges up to the next one: a partial ACK, and
    # the next hole goes at once (NewReno), not a retransmission timeout later
    answer(eng, reply(TARGET_ISN + 1, starts[4], P.ACK, window=56000))
    [again] = eng.sender.take()
    assert again.seq == starts[4]
    answer(eng, reply(TARGET_ISN + 1, ISN + 1 + 10000, P.ACK, window=65535))
    assert eng.sender.take() == []
    s = eng.sessions[(CLIENT, CPORT, TARGET, 80)]
    assert s.recover == -1 and not s.unacked
    assert eng.counters[C.INDEX["retransmits"]] == 0
    assert eng.counters[C.INDEX["fast_retransmits"]] == 2


def test_a_slow_target_gets_as_long_as_the_online_server_before_the_fin(eng):
    """The online server took 3 s to answer an upload; the client then acknowledges the
    answer and closes. The target, as slow, has not answered yet: the FIN waits for its
    answer (up to the pace timeout after the FIN was captured), instead of closing on a
    request still being served (nginx: 499)."""
    handshake(eng)
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"POST" * 100))
    answer(eng, reply(TARGET_ISN + 1, ISN + 401, P.ACK), now=100.01)   # all of it arrived
    eng.sender.take()
    feed(eng, client_pkt(ISN + 401, ONLINE_ISN + 100, P.ACK | P.FIN), now=103.0)
    eng.tick(103.5)
    assert not [p for p in eng.sender.take() if p.flags & P.FIN]
    answer(eng, reply(TARGET_ISN + 1, ISN + 401, P.ACK | P.PSH, payload_len=99), now=104.0)
    eng.tick(104.5)
    assert not [p for p in eng.sender.take() if p.flags & P.FIN]   # it is answering
    eng.tick(105.1)
    [fin] = [p for p in eng.sender.take() if p.flags & P.FIN]
    assert fin.seq == ISN + 401


def test_a_fin_waits_no_longer_than_the_pace_timeout_for_a_target_that_never_answers(eng):
    handshake(eng)
    feed(eng, client_pkt(ISN + 1, ONLINE_ISN + 1, P.ACK | P.PSH, b"GET"))
    answer(eng, reply(TARGET_ISN + 1, ISN + 4, P.ACK), now=100.01)
    eng.sender.take()
    feed(eng, client_pkt(ISN + 4, ONLINE_ISN + 100, P.ACK | P.FIN), now=103.0)
    eng.tick(104.9)
    assert not [p for p in eng.sender.take() if p.flags & P.FIN]
    eng.tick(105.1)
    [fin] = [p for p in eng.sender.take() if p.flags & P.FIN]
    assert fin.seq == ISN + 4
