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
