"""A share of the fuzz benchmark (tcpcopyd.lab.fuzz; BENCHMARKS.md has the full run):
random and mutated packets through the engine, random and mutated control frames through
both sides of the control channel. Nothing raises; every input is counted."""
from __future__ import annotations

from tcpcopyd.lab.fuzz import fuzz_control, fuzz_engine


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
