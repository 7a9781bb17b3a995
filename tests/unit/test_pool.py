"""A pool that grows and shrinks (workers = auto): when the master adds or gives back a
worker, how a worker finds the holder of a session it does not hold and hands it the
packet, and what the engine does with such a packet."""
import os

import pytest

from shm import segment as shmseg
from tcpcopyd.net import packet as P
from tcpcopyd.online import counters as C
from tcpcopyd.online.engine import Engine
from tcpcopyd.online.strays import Inboxes, Strays, key_of, table_size
from tcpcopyd.service.pool import GROW_AFTER, SETTLING, Load, Policy
from tests.unit.test_engine import (
    CLIENT,
    CPORT,
    ISN,
    SYN_OPTS,
    TARGET,
    FakeControl,
    FakeSender,
    client_pkt,
)

# ------------------------------------------------------------------ the policy


def policy(**kw):
    return Policy(**{"least": 1, "most": 4, "grow_at": 0.7, "shrink_at": 0.3,
                     "shrink_after": 10.0, **kw})


BUSY, CALM = Load(0.9, 0.9, False), Load(0.1, 0.2, False)


def test_a_worker_is_added_after_busy_samples_in_a_row_only():
    p = policy()
    assert [p.decide(t, 1, BUSY) for t in range(GROW_AFTER - 1)] == [0] * (GROW_AFTER - 1)
    assert p.decide(GROW_AFTER, 1, CALM) == 0          # the run is broken
    decisions = [p.decide(10 + t, 1, BUSY) for t in range(GROW_AFTER)]
    assert decisions == [0] * (GROW_AFTER - 1) + [1]
    # the next one needs a run of its own, on the pool it made
    assert p.decide(20, 2, BUSY) == 0


def test_a_lagging_capture_is_busy_whatever_the_cpu():
    p = policy()
    lag = Load(0.2, 0.2, True)
    assert [p.decide(t, 1, lag) for t in range(GROW_AFTER)][-1] == 1


def test_no_worker_beyond_the_most_nor_while_the_last_one_settles():
    p = policy(most=2)
    assert all(p.decide(t, 2, BUSY) == 0 for t in range(10))
    p = policy()
    settling = Load(0.9, 0.9, False, handed=SETTLING + 0.05)
    assert all(p.decide(t, 2, settling) == 0 for t in range(10))


def test_a_worker_is_given_back_after_shrink_after_seconds_of_calm():
    p = policy()
    assert p.decide(0.0, 2, CALM) == 0
    assert p.decide(9.0, 2, CALM) == 0
    assert p.decide(10.0, 2, CALM) == -1
    # a load that would not fit in one fewer keeps the pool; a busy sample starts it over
    p = policy()
    assert all(p.decide(t, 2, Load(0.2, 0.35, False)) == 0 for t in range(30))
    p = policy()
    p.decide(0.0, 2, CALM)
    p.decide(9.0, 2, BUSY)
    assert p.decide(12.0, 2, CALM) == 0 and p.decide(21.0, 2, CALM) == 0
    assert p.decide(22.0, 2, CALM) == -1


def test_the_last_worker_is_never_given_back():
    p = policy()
    assert all(p.decide(float(t), 1, Load(0.0, 0.0, False)) == 0 for t in range(100))


# ------------------------------------------------------------------ strays between workers

CAP = (CLIENT, CPORT, TARGET, 80)


@pytest.fixture
def pair():
    """Two workers' sides of a pool in a real segment, with real inboxes."""
    name = f"test-strays-{os.getpid()}"
    slots = 64
    seg = shmseg.create(name, C.KIND, 2, slots, 160, extra_size=table_size(2, slots))
    inboxes = Inboxes(2)
    counters = [[0] * len(C.NAMES) for _ in range(2)]
    sides = [Strays(seg, i, 2, inboxes, seg.extra_off, counters[i]) for i in range(2)]
    try:
        yield sides
    finally:
        inboxes.close()
        seg.close()
        seg.unlink()


def received(side):
    got = []
    side.read(lambda buf, n, now: got.append(bytes(buf[:n])), 1.0)
    return got


def test_a_packet_of_a_session_another_worker_holds_goes_to_its_inbox(pair):
    first, second = pair
    frame = client_pkt(ISN + 1, 1, P.ACK | P.PSH, b"GET / HTTP/1.1\r\n\r\n")
    # alone, nothing is published nor looked up
    first.publish(CAP)
    assert not second.hand_over(CAP, frame, len(frame))
    first.share([CAP])
    second.share([])
    assert first.counters[C.POOL_SHARED] == 1
    assert second.hand_over(CAP, frame + b"trailing", len(frame))
    assert received(first) == [frame]
    assert second.counters[C.STRAYS_HANDED] == 1 and first.counters[C.STRAYS_TAKEN] == 1
    # a session nobody holds, and one that ended, are not handed
    other = (CLIENT, CPORT + 1, TARGET, 80)
    assert not second.hand_over(other, frame, len(frame))
    first.withdraw(CAP)
    assert not second.hand_over(CAP, frame, len(frame))
    assert received(first) == []


def test_a_handed_packet_is_never_handed_on(pair):
    """A packet in a worker's inbox whose session that worker no longer holds (it ended
    in between) is not handed back, whoever the table names."""
    first, second = pair
    first.share([CAP])
    second.share([])
    frame = client_pkt(ISN + 1, 1, P.ACK, b"x")
    first.outboxes[1].send(frame)
    seen = []
    second.read(lambda buf, n, now: seen.append(second.hand_over(CAP, buf, n)), 1.0)
    assert seen == [False]
    assert second.hand_over(CAP, frame, len(frame))     # outside its inbox: handed


def test_a_full_inbox_loses_the_packet_counted_and_opens_nothing(pair):
    first, second = pair
    first.share([CAP])
    second.share([])
    frame = client_pkt(ISN + 1, 1, P.ACK, bytes(1400))
    handed = 0
    while second.counters[C.STRAYS_LOST] == 0 and handed < 100000:
        assert second.hand_over(CAP, frame, len(frame))
        handed += 1
    assert second.counters[C.STRAYS_LOST] == 1
    assert second.counters[C.STRAYS_HANDED] == handed - 1


def test_alone_again_the_published_sessions_are_gone(pair):
    first, second = pair
    first.share([CAP])
    second.share([])
    first.alone()
    assert first.counters[C.POOL_SHARED] == 0
    frame = client_pkt(ISN + 1, 1, P.ACK, b"x")
    assert not second.hand_over(CAP, frame, len(frame))


def test_the_key_names_the_whole_captured_session():
    assert key_of(CAP) != key_of((CLIENT, CPORT, TARGET, 81))
    assert key_of(CAP) == CLIENT + CPORT.to_bytes(2, "big") + TARGET + (80).to_bytes(2, "big")


# ------------------------------------------------------------------ the engine's side


class FakePool:
    def __init__(self, holds=()):
        self.holds = set(holds)
        self.log = []

    def publish(self, key):
        self.log.append(("publish", key))

    def withdraw(self, key):
        self.log.append(("withdraw", key))

    def hand_over(self, key, frame, n):
        self.log.append(("hand", key, bytes(frame[:n])))
        return key in self.holds


def engine(pool):
    e = Engine({80: (TARGET, 80)}, FakeSender(), FakeControl(), None, range(100))
    e.pool = pool
    return e


def test_the_engine_hands_over_a_packet_of_a_session_it_does_not_hold():
    pool = FakePool(holds={CAP})
    e = engine(pool)
    data = client_pkt(ISN + 1, 1, P.ACK | P.PSH, b"GET / HTTP/1.1\r\n\r\n")
    e.on_client_packet(data + bytes(6), len(data), 100.0)   # (an Ethernet pad behind it)
    e.flush(100.0)
    assert pool.log == [("hand", CAP, data)]
    assert not e.sessions and not e.sender.sent
    assert e.counters[C.SESSIONS_FAKE] == 0


def test_a_session_nobody_else_holds_opens_here_as_before():
    pool = FakePool()
    e = engine(pool)
    data = client_pkt(ISN + 1, 1, P.ACK | P.PSH, b"GET / HTTP/1.1\r\n\r\n")
    e.on_client_packet(data, len(data), 100.0)
    e.flush(100.0)
    assert pool.log[0][0] == "hand" and pool.log[1] == ("publish", CAP)
    assert e.counters[C.SESSIONS_FAKE] == 1


def test_a_syn_opens_here_is_published_and_withdrawn_when_it_ends():
    pool = FakePool(holds={CAP})
    e = engine(pool)
    syn = client_pkt(ISN, 0, P.SYN, options=SYN_OPTS)
    e.on_client_packet(syn, len(syn), 100.0)
    e.flush(100.0)
    assert pool.log == [("publish", CAP)]
    # a packet of a session it holds is not looked up
    data = client_pkt(ISN + 1, 1, P.ACK, b"x")
    e.on_client_packet(data, len(data), 100.1)
    assert pool.log == [("publish", CAP)]
    e.close_all()
    assert pool.log[-1] == ("withdraw", CAP)


def test_alone_nothing_is_looked_up():
    e = engine(None)
    data = client_pkt(ISN + 1, 1, P.ACK | P.PSH, b"x")
    e.on_client_packet(data, len(data), 100.0)
    assert e.counters[C.SESSIONS_FAKE] == 1
