"""Capture files for offline replay: link types, damaged files, truncated packets."""
from __future__ import annotations

import collections
import io
import struct

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpcopyd.net import pcapfile

IP = (bytes.fromhex("45000028000040004006" "0000" "c6120101c6120102")
      + struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0x50, 2, 1000, 0, 0))
FRAMES = {
    1: b"\x02" * 12 + b"\x08\x00" + IP,                                     # Ethernet
    101: IP,                                                                # raw IP
    113: bytes(14) + b"\x08\x00" + IP,                                      # Linux cooked
    276: b"\x08\x00" + bytes(18) + IP,                                      # Linux cooked v2
}


def pcap(linktype: int, frames: list[bytes], snaplen: int = 1500) -> bytes:
    buf = io.BytesIO()
    w = dpkt.pcap.Writer(buf, linktype=linktype, snaplen=snaplen)
    for i, frame in enumerate(frames):
        w.writepkt(frame, ts=1.0 + i)
    return buf.getvalue()


def read(tmp_path, data: bytes) -> tuple[list, collections.Counter]:
    path = tmp_path / "c.pcap"
    path.write_bytes(data)
    skipped: collections.Counter = collections.Counter()
    return list(pcapfile.packets(str(path), skipped)), skipped


IP6 = (bytes.fromhex("6000000000140640" "fd180001000000000000000000000001"
                      "fd180001000000000000000000000002")
       + struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0x50, 2, 1000, 0, 0))
FRAMES6 = {
    1: b"\x02" * 12 + b"\x86\xdd" + IP6,                                   # Ethernet
    101: IP6,                                                               # raw IP
    229: IP6,                                                               # raw IPv6
    113: bytes(14) + b"\x86\xdd" + IP6,                                    # Linux cooked
    276: b"\x86\xdd" + bytes(18) + IP6,                                    # Linux cooked v2
    0: struct.pack("<I", 30) + IP6,                                         # BSD loopback
}


@pytest.mark.parametrize("linktype", sorted(FRAMES6))
def test_ipv6_on_every_link_type(tmp_path, linktype):
    got, skipped = read(tmp_path, pcap(linktype, [FRAMES6[linktype], FRAMES6[linktype] + b"x"]))
    # (the second one's Ethernet padding, one byte past the payload length, is cut)
    assert [(ts, pkt) for ts, pkt in got] == [(1.0, IP6), (2.0, IP6)] and not skipped


@pytest.mark.parametrize("linktype", sorted(FRAMES))
def test_link_types(tmp_path, linktype):
    got, skipped = read(tmp_path, pcap(linktype, [FRAMES[linktype]] * 2))
    assert [(ts, pkt) for ts, pkt in got] == [(1.0, IP), (2.0, IP)] and not skipped


def test_vlan_tags_and_other_protocols(tmp_path):
    vlan = b"\x02" * 12 + b"\x81\x00\x00\x05\x08\x00" + IP
    arp = b"\x02" * 12 + b"\x08\x06" + bytes(28)
    got, skipped = read(tmp_path, pcap(1, [vlan, arp]))
    assert [pkt for _, pkt in got] == [IP] and skipped == {"not_ip": 1}


def test_packets_cut_by_the_snap_length_are_skipped(tmp_path):
    big = bytearray(FRAMES[1] + bytes(100))
    struct.pack_into("!H", big, 16, len(IP) + 100)       # IP total length with payload
    got, skipped = read(tmp_path, pcap(1, [bytes(big)[:60]], snaplen=60))
    assert got == [] and skipped["truncated"] == 1


def test_unknown_link_type_and_not_a_capture(tmp_path):
    with pytest.raises(pcapfile.CaptureFileError, match="link type 147"):
        read(tmp_path, pcap(147, [IP]))
    for junk in (b"", b"hello world, not a capture", bytes(10)):
        with pytest.raises(pcapfile.CaptureFileError, match="not a pcap or pcapng"):
            read(tmp_path, junk)


def test_a_capture_cut_short_ends_with_what_is_whole(tmp_path):
    data = pcap(1, [FRAMES[1]] * 3)
    got, skipped = read(tmp_path, data[:24 + 16 + len(FRAMES[1]) + 6])
    assert len(got) == 1 and skipped["damaged_tail"] == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_after_a_valid_header_never_crash(tmp_path_factory, tail):
    path = tmp_path_factory.mktemp("fuzz") / "f.pcap"
    path.write_bytes(pcap(1, [])[:24] + tail)
    skipped: collections.Counter = collections.Counter()
    for _ts, pkt in pcapfile.packets(str(path), skipped):
        assert len(pkt) >= 20


def test_the_position_follows_the_reading_to_the_end_of_the_file(tmp_path):
    path = tmp_path / "c.pcap"
    path.write_bytes(pcap(1, [FRAMES[1]] * 2000))
    position = pcapfile.Position()
    shares = [position.share for _ in pcapfile.packets(str(path), collections.Counter(),
                                                        position=position)]
    assert position.size == path.stat().st_size
    assert shares == sorted(shares)          # never backwards
    assert 0 < shares[len(shares) // 2] < 1  # in the middle, somewhere in the file
    assert position.share == 1.0
