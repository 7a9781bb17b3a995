"""A share of the fuzz benchmark (tcpcopyd.lab.fuzz; BENCHMARKS.md has the full run):
random and mutated packets through the engine, random and mutated control frames through
both sides of the control channel. Nothing raises; every input is counted."""
from __future__ import annotations

from tcpcopyd.lab.fuzz import fuzz_control, fuzz_engine, fuzz_tags


def test_random_and_mutated_packets_through_the_engine():
    r = fuzz_engine(60_000, seed=7)
    c = r["counters"]
    assert c["captured"] == r["client_packets"] and c["replies"] == r["replies"]
    assert c["malformed"] > 0 and c["replies_malformed"] > 0
    assert r["sessions_left"] == 0 and r["buffered_left"] == 0   # all expired, all freed
    assert r["out_of_order_left"] == 0


def test_random_and_mutated_control_frames_through_both_sides():
    r = fuzz_control(4_000, seed=7)
    assert r["link_errors"] > 0 and r["reply_headers"] > 0
    inter = r["interceptd"]
    assert inter["peers_accepted"] == r["control_connections"]
    assert inter.get("bad_messages", 0) + inter.get("bad_peers", 0) > 0


def test_random_mutated_and_lying_packets_through_interceptds_reply_path():
    from tcpcopyd.lab.fuzz import fuzz_replies
    r = fuzz_replies(40_000, seed=7)
    assert r["malformed"] > 5_000 and r["routed"] > 5_000   # both kinds were exercised
    assert r["ring_groups_broken"] > 0
    assert r["router"]["routed"] > 0


def test_a_short_total_length_with_ip_options_is_malformed_not_a_crash():
    """The frame that killed assistant-mode workers (#19): options, total length < IHL."""
    import pytest

    from tcpcopyd.lab.fuzz import CLIENT, TARGET
    from tcpcopyd.net import packet as P
    from tcpcopyd.net import wire
    pkt = bytearray(P.build(TARGET, CLIENT, 80, 40000, 1, 2, P.ACK, 100, b"", b"x"))
    pkt[20:20] = bytes(8)
    pkt[0] = 0x47
    pkt[2:4] = (24).to_bytes(2, "big")
    with pytest.raises(wire.ProtocolError):
        wire.reply_header(bytes(pkt))


def test_attacked_authenticated_streams_give_nothing_but_what_was_tagged():
    r = fuzz_tags(4_000, seed=7)
    assert r["forged"] == 0
    assert r["refused"] > 1_000 and r["items_taken"] > 10_000   # both outcomes exercised
