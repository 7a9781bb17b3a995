"""Shared-memory hand-off ring and key table, across real processes."""
import multiprocessing as mp
import os

import pytest

from shm import segment as shmseg
from shm.keytable import KeyTable, OwnedRegion, region_size
from shm.ring import Ring, ring_size


@pytest.fixture
def seg():
    s = shmseg.create(f"tcpcopyd-test-ring-{os.getpid()}", 2, 2, 0, 64,
                      extra_size=ring_size(64, 64) + 2 * region_size(256))
    yield s
    s.close()
    s.unlink()


def _producer(name: str, n: int) -> None:
    s = shmseg.attach(name)
    ring = Ring(s.mm, s.extra_off, 64, 64)
    i = 0
    while i < n:
        i += ring.push([i.to_bytes(8, "little") * 8 for i in range(i, min(n, i + 10))])
    os._exit(0)


def test_ring_delivers_every_record_once_in_order_across_processes(seg):
    n = 200_000
    p = mp.get_context("fork").Process(target=_producer, args=(seg.name, n))
    p.start()
    ring = Ring(seg.mm, seg.extra_off, 64, 64)
    got = 0
    while got < n:
        for rec in ring.pop_all():
            assert rec == got.to_bytes(8, "little") * 8
            got += 1
    p.join(30)
    assert p.exitcode == 0
    assert ring.pop_all() == []


def test_ring_refuses_what_does_not_fit(seg):
    ring = Ring(seg.mm, seg.extra_off, 64, 64)
    assert ring.push([bytes(64)] * 100) == 64
    assert len(ring) == 64
    assert len(ring.pop_all()) == 64
    assert ring.push([bytes(64)] * 10) == 10


def test_key_table_regions_have_one_writer_and_any_reader(seg):
    off = seg.extra_off + ring_size(64, 64)
    table = KeyTable(seg.mm, off, 2, 256)
    mine, other = OwnedRegion(table, 0), OwnedRegion(table, 1)
    keys = [bytes([198, 18, 1, i % 250]) + (1000 + i).to_bytes(2, "big") for i in range(150)]
    for i, k in enumerate(keys):
        assert other.put(k, i)
    assert all(table.find(k, skip=0) == (1, i) for i, k in enumerate(keys))
    assert table.find(keys[0], skip=1) is None
    for k in keys[:140]:
        other.remove(k)
    for i, k in enumerate(keys[140:], 140):  # tombstones do not hide later keys
        assert table.find(k) == (1, i)
    for i in range(300):                      # reuse after deletes triggers a rebuild
        k = b"\x0a\x00\x00\x01" + i.to_bytes(2, "big")
        assert other.put(k, i)
        other.remove(k)
    assert all(table.find(k) == (1, i) for i, k in enumerate(keys[140:], 140))
    assert mine.put(keys[0], 7) and table.find(keys[0], skip=1) == (0, 7)


def test_emptying_a_region_moves_every_counter_on(seg):
    """No ABA: a reader that read a bucket's counter before the owner empties its region
    (a rebuild) never finds the same counter after it, so it never takes a torn bucket."""
    from shm import seqlock
    from shm.keytable import BUCKET
    table = KeyTable(seg.mm, seg.extra_off + ring_size(64, 64), 2, 256)
    region = OwnedRegion(table, 0)
    keys = [b"\xc6\x12\x01\x01" + i.to_bytes(2, "big") for i in range(100)]
    for i, k in enumerate(keys):
        region.put(k, i)
    before = {i: seqlock.SEQ.unpack_from(seg.mm, table._bucket(0, i))[0]
              for i in region.where.values()}
    region.clear()
    for i, seq in before.items():
        off = table._bucket(0, i)
        after = seqlock.SEQ.unpack_from(seg.mm, off)[0]
        assert after > seq and not after & 1       # forward: never back to an old value
        assert seqlock.read(seg.mm, off, BUCKET)[1] == 0    # EMPTY
    assert all(table.lookup(0, k) is None for k in keys)


def test_ipv6_keys_live_beside_ipv4_keys_of_the_same_first_bytes(seg):
    table = KeyTable(seg.mm, seg.extra_off + ring_size(64, 64), 2, 256)
    region = OwnedRegion(table, 1)
    v4 = [bytes([198, 18, 1, i]) + (1000 + i).to_bytes(2, "big") for i in range(40)]
    v6 = [bytes.fromhex("fd180001") + bytes(11) + bytes([i]) + (1000 + i).to_bytes(2, "big")
          for i in range(40)]
    for i, (a, b) in enumerate(zip(v4, v6, strict=True)):
        assert region.put(a, i) and region.put(b, 100 + i)
    assert all(table.find(k) == (1, i) for i, k in enumerate(v4))
    assert all(table.find(k) == (1, 100 + i) for i, k in enumerate(v6))
    # an IPv6 key whose 6 stored bytes would be an IPv4 key's is still another key
    from shm.keytable import stored
    assert stored(v6[0])[1] == 6 and stored(v4[0]) == (v4[0], 4)
    for k in v6:
        region.remove(k)
    assert all(table.find(k) is None for k in v6)
    assert all(table.find(k) == (1, i) for i, k in enumerate(v4))
