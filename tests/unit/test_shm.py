import multiprocessing as mp
import os
import struct
import time

import pytest

from shm import segment as shmseg
from shm import seqlock
from shm.table import SlotTable

LAYOUT = struct.Struct("<QQQQQQQQ")  # eight copies of one value: a torn read mixes them


@pytest.fixture
def seg():
    name = f"tcpcopyd-test-{os.getpid()}"
    s = shmseg.create(name, 1, 4, 64, 96, label="test")
    yield s
    s.close()
    s.unlink()


def test_create_attach_and_layout(seg):
    other = shmseg.attach(seg.name)
    assert (other.n_workers, other.n_slots, other.slot_size, other.label) == (4, 64, 96, "test")
    assert other.master_pid == os.getpid()
    other.close()


def test_create_refuses_a_live_owner(seg):
    # the segment's master pid is ours: another create from a different process must fail
    def child():
        try:
            shmseg.create(seg.name, 1, 1, 1, 96)
        except shmseg.SegmentError as e:
            os._exit(0 if "belongs to running process" in str(e) else 2)
        os._exit(1)
    p = mp.get_context("fork").Process(target=child)
    p.start()
    p.join()
    assert p.exitcode == 0


def test_stale_segment_is_replaced(seg):
    struct.pack_into("<I", seg.mm, 32, 999999)  # master pid field -> a pid that does not exist
    again = shmseg.create(seg.name, 1, 2, 8, 96)
    assert again.n_workers == 2
    again.close()


def test_slot_partition_covers_every_slot_once(seg):
    t = SlotTable(seg, LAYOUT)
    ranges = [t.owned_range(w) for w in range(4)]
    assert sorted(i for r in ranges for i in r) == list(range(64))


def test_worker_records_and_restarts(seg):
    seg.write_worker(2, 1234, 1, 100.0, [5, 6, 7])
    seg.add_restart(2)
    rec = seg.read_worker(2)
    assert (rec.pid, rec.cpu, rec.started, rec.counters[:4], rec.restarts) == \
        (1234, 1, 100.0, (5, 6, 7, 0), 1)


def _writer(name: str, worker: int, stop_at: float) -> None:
    seg = shmseg.attach(name)
    t = SlotTable(seg, LAYOUT)
    v = 0
    slots = t.owned_range(worker)
    while time.time() < stop_at:
        v += 1
        for slot in slots:
            t.write(slot, (v,) * 8)
    os._exit(0)


def _reader(name: str, stop_at: float, q) -> None:
    seg = shmseg.attach(name)
    t = SlotTable(seg, LAYOUT)
    reads = torn = 0
    while time.time() < stop_at:
        for slot in range(seg.n_slots):
            try:
                vals = t.read(slot)
            except seqlock.TornRead:
                continue  # never returned a mixed record: that is the point
            reads += 1
            if len(set(vals)) != 1:
                torn += 1
    q.put((reads, torn))
    os._exit(0)


def test_concurrent_writers_and_readers_never_tear(seg):
    ctx = mp.get_context("fork")
    stop_at = time.time() + 2.0
    q = ctx.SimpleQueue()
    procs = [ctx.Process(target=_writer, args=(seg.name, w, stop_at)) for w in range(4)]
    procs += [ctx.Process(target=_reader, args=(seg.name, stop_at, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get() for _ in range(2)]
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    assert sum(r for r, _ in results) > 1000
    assert sum(t for _, t in results) == 0


def test_header_label_settings_and_restarts_do_not_overlap():
    name = f"test-hdr-{os.getpid()}"
    seg = shmseg.create(name, 1, 2, 4, 64, label="x" * 40)
    try:
        seg.write_settings({"sample_rate": 20})
        seg.add_restart(0)
        seg.add_restart(0)
        other = shmseg.attach(name)
        assert other.label == "x" * 20
        assert other.read_settings() == {"sample_rate": 20}
        assert other.read_worker(0).restarts == 2
        assert other.read_worker(1).restarts == 0
        other.close()
    finally:
        seg.close()
        seg.unlink()


def test_a_record_derives_struct_offsets_and_names_from_its_field_table():
    from shm.record import Record
    r = Record("R", (("pid", "I"), ("pad", "2x"), ("label", "6s"), ("counters", "3Q"),
                     ("flag", "B")))
    assert r.size == 4 + 2 + 6 + 24 + 1
    assert r.offsets == {"pid": 0, "pad": 4, "label": 6, "counters": 12, "flag": 36}
    assert r.names == ("pid", "label", "counters", "flag")
    v = r.unpack(r.pack(7, b"abc", (1, 2, 3), 9))
    assert (v.pid, v.label, v.counters, v.flag) == (7, b"abc\0\0\0", (1, 2, 3), 9)
    assert r.pack(pid=7, label=b"abc", counters=(1, 2, 3), flag=9) == r.pack(7, b"abc",
                                                                             (1, 2, 3), 9)
    assert r.empty() == (0, bytes(6), (0, 0, 0), 0)
    net = Record("N", (("port", "H"),), order="!")
    assert net.pack(0x1234) == b"\x12\x34"


def test_the_shm_records_keep_their_places():
    # a reader of another release finds the header fields where they always were
    assert shmseg.HEADER.offset("master_pid") == 28 and shmseg.HEADER.size == 64
    assert shmseg.WORKER.offset("counters") == 24
    from tcpcopyd.online.session import SLOT, SLOT_SIZE
    assert SLOT.size + 4 <= SLOT_SIZE


def test_a_slot_left_odd_by_a_killed_writer_reads_as_torn_and_clears(seg):
    t = SlotTable(seg, LAYOUT)
    t.write(3, (5,) * 8)
    off = seg.slot_offset(3)
    seqlock.SEQ.pack_into(seg.mm, off, seqlock.SEQ.unpack_from(seg.mm, off)[0] + 1)  # odd
    with pytest.raises(seqlock.TornRead):
        t.read(3)
    t.clear(3)
    assert t.read(3) == (0,) * 8
