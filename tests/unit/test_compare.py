"""The comparison test's parts without a network: exchanges told apart and paired, the
records' way to compare_log, the noise rules, the payload frames of the control channel,
interceptd's hand-off of records with payload, and the report."""
from __future__ import annotations

import json
import socket

import pytest

from interceptd.worker import PREFIX_MARK, from_ring_records, ring_records
from tcpcopyd.ctl import report
from tcpcopyd.net import wire
from tcpcopyd.online import answers, compare, comparelog
from tcpcopyd.online.compare import Exchanges

KEY = (socket.inet_aton("198.18.1.1"), 40000, socket.inet_aton("198.18.2.2"), 80)
OK = b"HTTP/1.1 200 OK\r\nDate: Mon, 30 Nov 2026 08:00:00 GMT\r\nContent-Length: 2\r\n\r\nok"
FAIL = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"


def exchanges() -> tuple[Exchanges, list[dict]]:
    out: list[dict] = []
    ex = Exchanges(out.append, {})
    ex.opened(KEY)
    return ex, out


def test_exchanges_are_known_by_their_sequence_numbers_whatever_the_order():
    ex, out = exchanges()
    seq, srv, tsrv = 1000, 5000, 9000
    reqs = []
    for path in (b"/a", b"/fail"):
        req = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        reqs.append((seq, req))
        seq += len(req)
    (s1, r1), (s2, r2) = reqs
    # the second request is captured before the first answer (two sockets, any order)
    ex.online_request(KEY, s1, srv, len(r1), r1, 10.0)
    ex.online_request(KEY, s1, srv, len(r1), r1, 10.0005)          # a retransmission
    ex.online_request(KEY, s2, srv + len(OK), len(r2), r2, 10.010)
    ex.online_answer(KEY, srv, s2, len(OK), OK, 10.003)              # acks request 1
    ex.online_answer(KEY, srv + len(OK), seq, len(OK), OK, 10.011)   # acks request 2
    ex.target_request(KEY, s1, r1, 10.002)
    ex.target_answer(KEY, tsrv, s2, len(OK), OK, 10.052)
    ex.target_request(KEY, s2, r2, 10.060)
    assert len(out) == 0
    ex.target_answer(KEY, tsrv + len(OK), seq, len(FAIL), FAIL, 10.070)
    assert len(out) == 1                  # the first is over on both sides
    ex.closed(KEY)
    assert [r["n"] for r in out] == [1, 2]
    first, second = out
    assert first["request"].startswith(b"GET /a ")
    assert first["online"]["ttfb_ms"] == 3.0 and first["target"]["ttfb_ms"] == 50.0
    assert first["online"]["size"] == len(OK) and first["target"]["first"] == OK
    assert second["request"].startswith(b"GET /fail ")
    assert second["target"]["first"] == FAIL and second["online"]["size"] == len(OK)
    assert second["online"]["ttfb_ms"] == 1.0 and second["target"]["ttfb_ms"] == 10.0


def test_a_side_without_the_other_is_handed_on_after_the_wait():
    ex, out = exchanges()
    ex.online_request(KEY, 1, 7, 5, b"get k", 1.0)
    ex.online_answer(KEY, 7, 6, 5, b"END\r\n", 1.001)
    ex.sweep(1.5)
    assert out == []
    ex.sweep(100.0)
    assert len(out) == 1 and out[0]["target"] is None and out[0]["online"]["size"] == 5


def test_records_reach_the_log_judged_with_the_noise_rules():
    ex, out = exchanges()
    req = b"GET /d?x=1 HTTP/1.1"
    ex.online_request(KEY, 1, 50, len(req), req, 1.0)
    ex.target_request(KEY, 1, req, 1.001)
    ex.online_answer(KEY, 50, 1 + len(req), len(OK), OK, 1.002)
    other = OK.replace(b"08:00:00", b"08:00:01")
    ex.target_answer(KEY, 70, 1 + len(req), len(other), other, 1.004)
    ex.closed(KEY)
    rec = comparelog.decode(comparelog.encode(out[0]))
    judged = comparelog.judged(rec, answers.Rules.parse(["Date"]))
    assert (judged["path"], judged["online"]["status"], judged["target"]["status"]) == \
        ("/d", "200", "200")
    assert judged["same_status"] and judged["same_size"] and judged["same_content"]
    assert comparelog.judged(comparelog.decode(comparelog.encode(out[0])),
                             answers.Rules.parse([]))["same_content"] is False
    assert judged["client"] == "198.18.1.1:40000" and judged["target"]["ttfb_ms"] == 3.0


def test_noise_rules_take_headers_and_expressions():
    rules = answers.Rules.parse(["x-id", "re:[0-9a-f]{8}"])
    a = b"HTTP/1.1 200 OK\r\nX-Id: 1\r\n\r\nid deadbeef"
    b = b"HTTP/1.1 200 OK\r\nX-ID: 2\r\n\r\nid 0badcafe"
    assert rules.clean(a) == rules.clean(b)
    assert answers.status_of(b"VALUE k 0 1\r\nx\r\nEND\r\n") == "VALUE k 0 1"
    assert answers.path_of(b"get somekey\r\n") == "get somekey"


def test_payload_frames_carry_an_answers_first_bytes_between_combined_frames():
    header = bytes(range(64))
    records = [header, header + b"HTTP/1.1 200 OK", header]
    framed = wire.combine(records, payload=True)
    assert wire.split_combined(bytearray(framed), []) == records
    plain = wire.combine(records, payload=False)       # a peer that did not ask
    assert wire.split_combined(bytearray(plain)) == [header] * 3


def test_interceptd_hands_records_with_payload_through_its_rings_whole():
    rec = bytes(64) + b"x" * 200
    group = ring_records(rec)
    assert group[0][:4] == PREFIX_MARK and len(group) == 1 + 5
    assert all(len(r) == 64 for r in group)
    assert ring_records(bytes(64)) == [bytes(64)]
    # an IPv6 record (84 bytes), alone and with payload bytes, between IPv4 ones
    v6 = b"\x60" + bytes(83)
    records = [bytes(64), v6, v6 + b"HTTP/1.1 200", rec, bytes(64)]
    ring = [r for record in records for r in ring_records(record)]
    assert from_ring_records(ring) == (records, 0)
    assert from_ring_records(ring[:-3]) == (records[:3], 1)    # a group cut short


def test_the_report_counts_mismatches_and_latency(tmp_path):
    lines = []
    for i in range(10):
        fail = i < 3
        lines.append({"ts": 100.0 + i / 10, "request": "GET /fail HTTP/1.1" if fail else
                      "GET / HTTP/1.1", "path": "/fail" if fail else "/",
                      "online": {"status": "200", "size": 10, "first": "HTTP/1.1 200 OK",
                                 "ttfb_ms": 1.0, "ttlb_ms": 1.0 + i},
                      "target": {"status": "500" if fail else "200", "size": 10,
                                 "first": "x", "ttfb_ms": 2.0, "ttlb_ms": 2.0 * (1 + i)},
                      "same_status": not fail, "same_size": True, "same_content": not fail})
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    s = report.summarize(report.read(str(path)))
    assert (s["exchanges"], s["compared"], s["status_mismatches"]) == (10, 10, 3)
    assert s["status_mismatch_pairs"] == {"200→500": 3}
    assert s["status_mismatches_by_path"] == {"/fail": 3}
    assert s["online_latency_ms"]["p50"] == 5.0 and s["target_latency_ms"]["p50"] == 10.0
    assert s["latency_ratio"]["p50"] == 2.0
    page = report.html(s, "c.jsonl")
    assert '<td id="status_mismatches">3</td>' in page and "<svg" in page


def test_the_exchanges_held_are_bounded(monkeypatch):
    monkeypatch.setattr(compare, "MAX_PENDING", 4)
    ex, out = exchanges()
    for i in range(10):       # a fast client, a target that never answers
        ex.online_request(KEY, 1 + 10 * i, 100 + i, 10, b"x" * 10, float(i))
    assert len(ex.conversations[KEY].exchanges) == 4 and ex.pending == 4
    assert len(out) == 6 and all(r["target"] is None for r in out)


def test_an_answer_read_before_its_request_waits_for_it():
    ex, out = exchanges()
    ex.online_request(KEY, 1, 100, 5, b"set a", 1.0)
    assert not ex.online_answer(KEY, 100, 6, 8, b"STORED\r\n", 1.001)
    # the next one's, read first: it waits, and says so (the worker reads the capture)
    assert ex.online_answer(KEY, 108, 11, 8, b"STORED\r\n", 1.003)
    ex.online_request(KEY, 6, 108, 5, b"set b", 1.002)
    ex.closed(KEY)
    assert [(r["request"], r["online"]["size"], r["online"]["ttfb_ms"]) for r in out] == \
        [(b"set a", 8, 1.0), (b"set b", 8, 1.0)]
    assert ex.answers_lost == 0


def test_answers_far_ahead_of_their_requests_are_counted_when_dropped():
    ex, out = exchanges()
    ex.online_request(KEY, 1, 100, 5, b"set 0", 1.0)
    ahead = compare.MAX_EARLY + 3
    for i in range(1, ahead + 1):       # the answers to sets 1.. before those sets
        assert ex.online_answer(KEY, 100 + 8 * i, 6 + 5 * i, 8, b"STORED\r\n", 1.0 + i)
    assert ex.answers_lost == 3
    for i in range(1, ahead + 1):
        ex.online_request(KEY, 1 + 5 * i, 100 + 8 * i, 5, b"set %d" % i, 2.0 + i)
    ex.closed(KEY)
    sizes = [r["online"]["size"] for r in out]
    assert sizes[1:] == [8] * compare.MAX_EARLY + [0] * 3


def test_the_report_command_names_a_bad_file_or_rule(tmp_path, capsys):
    from tcpcopyd.ctl import cli as ctl
    bad = tmp_path / "x.jsonl"
    bad.write_text("not json\n")
    assert ctl.main(["report", str(bad)]) == 1
    assert f"{bad}:1: not a JSON line of compare_log" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ctl.main(["report", str(bad), "--ignore", "re:("])
    assert e.value.code == 2
    assert "not a regular expression" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    page = tmp_path / "empty.html"
    assert ctl.main(["report", str(empty), "--html", str(page)]) == 0
    assert '<td id="exchanges">0</td>' in page.read_text()


def test_the_master_never_stops_on_a_log_it_cannot_write(tmp_path):
    rings = comparelog.Rings(1)
    ex, out = exchanges()
    ex.online_request(KEY, 1, 7, 5, b"get k", 1.0)
    ex.closed(KEY)
    clog = comparelog.CompareLog("/dev/full", rings, ("Date",))
    rings.ring(0).push([comparelog.encode(out[0])])
    assert clog.drain() == 0 and clog.lost == 1          # ENOSPC: counted, said
    clog.path = str(tmp_path / "c.jsonl")
    clog.reopen()
    rings.ring(0).push([comparelog.encode(out[0])])
    assert clog.drain() == 1
    clog.close()
    [line] = (tmp_path / "c.jsonl").read_text().splitlines()
    assert json.loads(line)["request"] == "get k"


def test_the_rings_are_anonymous_memory_left_out_of_core_dumps():
    # not a file anybody could open (the shm segment is the status group's), and not in a
    # worker's core dump
    import ctypes

    rings = comparelog.Rings(2)
    start = ctypes.addressof(ctypes.c_char.from_buffer(rings.mm))
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    at = next(i for i, line in enumerate(lines)
              if "-" in line.split()[0] and int(line.split()[0].split("-")[0], 16) <= start
              < int(line.split()[0].split("-")[1], 16))
    head = lines[at].split()
    assert len(head) < 6 or head[5].startswith("/dev/zero"), lines[at]   # anonymous
    flags = next(line for line in lines[at + 1:] if line.startswith("VmFlags:"))
    assert " sh" in flags and " dd" in flags, flags
