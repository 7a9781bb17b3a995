"""The capture reader on a receive ring written by hand: frames read in turn across the
wrap and given back, the start of the run found (a new worker, or one that carries on after
a worker died), packets too large for a frame read from the socket's queue, cut ones
counted as lost, stale ones dropped, the budget kept."""
from __future__ import annotations

import mmap
import socket
import time

import pytest

from tcpcopyd.net import ring as R
from tcpcopyd.net.reader import LOST, CaptureReader

NET = 80   # where the packet starts in a frame (the kernel puts it after the headers)


@pytest.fixture
def ring():
    ring = mmap.mmap(-1, R.RING_BYTES)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    yield ring, a, b
    a.close()
    b.close()


def put(ring: mmap.mmap, i: int, payload: bytes, when: float | None = None,
        status: int = R.TP_STATUS_USER, wire: int | None = None) -> None:
    """Frame ``i`` handed to the reader, holding ``payload`` captured at ``when``."""
    when = time.time() if when is None else when
    n = min(len(payload), R.FRAME_SIZE - NET)
    off = i * R.FRAME_SIZE
    R.FRAME_HEAD.pack_into(ring, off, status, len(payload) if wire is None else wire, n,
                           NET - 14, NET, int(when), int(when % 1 * 1e9))
    ring[off + NET:off + NET + n] = payload[:n]


def status(ring: mmap.mmap, i: int) -> int:
    return R.STATUS.unpack_from(ring, i * R.FRAME_SIZE)[0]


def read_all(reader: CaptureReader, budget: int = 1000) -> list[bytes]:
    got: list[bytes] = []
    reader.read(lambda data, n, now: got.append(bytes(data[:n])), time.monotonic(),
                budget, 1.0)
    return got


def test_frames_in_turn_across_the_wrap_and_given_back(ring):
    mem, sock, _ = ring
    last = R.FRAMES - 1
    for k, i in enumerate((last - 1, last, 0, 1)):
        put(mem, i, b"packet%d" % k)
    reader = CaptureReader(sock, mem, max_lag=5.0)
    assert read_all(reader) == [b"packet0", b"packet1", b"packet2", b"packet3"]
    assert all(status(mem, i) == R.TP_STATUS_KERNEL for i in (last - 1, last, 0, 1))
    assert reader.next == 2
    put(mem, 2, b"later")
    assert read_all(reader) == [b"later"]
    assert reader.last_time() == pytest.approx(time.time(), abs=1.0)


def test_the_run_found_where_a_dead_worker_left_it(ring):
    mem, sock, _ = ring
    for i in range(100, 105):
        put(mem, i, b"p%d" % i)
    reader = CaptureReader(sock, mem, max_lag=5.0)
    assert read_all(reader) == [b"p%d" % i for i in range(100, 105)]


def test_a_full_ring_is_read_from_its_oldest_frame(ring):
    mem, sock, _ = ring
    now = time.time()
    for i in range(R.FRAMES):
        # the kernel filled 300.. to the end, then 0..299
        put(mem, i, b"x", when=now - 1.0 + (i - 300 if i >= 300 else R.FRAMES - 300 + i) * 1e-5)
    reader = CaptureReader(sock, mem, max_lag=5.0)
    assert reader._find_start() == 300
    assert len(read_all(reader, budget=R.FRAMES)) == R.FRAMES
    assert reader.next == 300


def test_a_packet_larger_than_a_frame_comes_from_the_queue(ring):
    mem, sock, peer = ring
    big = bytes(range(256)) * 20
    put(mem, 0, b"small")
    put(mem, 1, big, status=R.TP_STATUS_USER | R.TP_STATUS_COPY)
    peer.send(big)
    put(mem, 2, b"after")
    reader = CaptureReader(sock, mem, max_lag=5.0)
    assert read_all(reader) == [b"small", big, b"after"]
    assert reader.take_lost() == 0


def test_a_cut_packet_with_no_copy_is_lost_not_handed_on(ring):
    mem, sock, _ = ring
    put(mem, 0, b"a" * 100, wire=3000)          # the queue had no room for its copy
    put(mem, 1, b"b" * 100, status=R.TP_STATUS_USER | R.TP_STATUS_COPY)  # copy gone
    put(mem, 2, b"whole")
    reader = CaptureReader(sock, mem, max_lag=5.0)
    assert read_all(reader) == [b"whole"]
    assert reader.take_lost() == 2
    assert reader.take_lost() == 0
    assert status(mem, 0) == status(mem, 1) == R.TP_STATUS_KERNEL


def test_stale_packets_dropped_until_within_half_the_lag(ring):
    mem, sock, _ = ring
    now = time.time()
    for i in range(10):
        put(mem, i, b"old%d" % i, when=now - 30.0)
    for i in range(10, 13):
        put(mem, i, b"new%d" % i, when=now - 0.1)
    reader = CaptureReader(sock, mem, max_lag=2.0)
    assert read_all(reader) == [b"new10", b"new11", b"new12"]
    assert reader.take_dropped() == 10
    assert all(status(mem, i) == R.TP_STATUS_KERNEL for i in range(13))
    assert reader.take_peak() < 1.0


def test_the_budget_is_kept(ring):
    mem, sock, _ = ring
    for i in range(50):
        put(mem, i, b"p%d" % i)
    reader = CaptureReader(sock, mem, max_lag=5.0)
    assert read_all(reader, budget=20) == [b"p%d" % i for i in range(20)]
    assert status(mem, 20) & R.TP_STATUS_USER
    assert read_all(reader, budget=100) == [b"p%d" % i for i in range(20, 50)]


def test_two_empty_reads_look_for_the_run_again(ring):
    mem, sock, _ = ring
    put(mem, 0, b"first")
    reader = CaptureReader(sock, mem, max_lag=5.0)
    assert read_all(reader) == [b"first"]
    assert read_all(reader) == [] and reader.next == 1
    assert read_all(reader) == [] and reader.next == LOST
    put(mem, 40, b"elsewhere")
    assert read_all(reader) == [b"elsewhere"]


def test_an_empty_ring_reads_nothing(ring):
    mem, sock, _ = ring
    reader = CaptureReader(sock, mem, max_lag=5.0)
    assert read_all(reader) == [] and reader.next == LOST
