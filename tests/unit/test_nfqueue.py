"""interceptd's own reading of an NFQUEUE binding: the packets of a read handed on, one
batch verdict for all of them, and every malformed message counted and skipped.

The kernel side is a datagram socket pair standing in for the netlink socket (the lab
tests read a real queue): the test writes the kernel's messages and reads the verdicts."""
from __future__ import annotations

import random
import socket
import struct

import pytest

from interceptd import nfqueue as N

QUEUE = 7


def attr(kind: int, body: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(body), kind) + body
    return raw + bytes(-len(raw) % 4)


def packet_message(packet_id: int, payload: bytes, queue: int = QUEUE,
                   extra: bytes = b"") -> bytes:
    body = struct.pack("!BBH", socket.AF_INET, 0, queue) + \
        attr(N.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 1) + b"\0") + \
        extra + attr(N.NFQA_PAYLOAD, payload)
    return struct.pack("=IHHII", 16 + len(body), N.NFQNL_MSG_PACKET, 0, 0, 0) + body


def verdicts(kernel: socket.socket) -> list[tuple[int, int, int]]:
    """(queue, verdict, id) of each batch verdict the reader sent."""
    out = []
    kernel.setblocking(False)
    while True:
        try:
            msg = kernel.recv(4096)
        except BlockingIOError:
            return out
        length, kind, flags, _, _ = struct.unpack_from("=IHHII", msg)
        assert (length, kind, flags) == (len(msg), N.NFQNL_MSG_VERDICT_BATCH, N.NLM_F_REQUEST)
        _, _, queue = struct.unpack_from("!BBH", msg, 16)
        alen, atype = struct.unpack_from("=HH", msg, 20)
        assert (alen, atype) == (12, N.NFQA_VERDICT_HDR)
        verdict, packet_id = struct.unpack_from("!II", msg, 24)
        out.append((queue, verdict, packet_id))


@pytest.fixture
def pair():
    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader = N.QueueReader(ours.fileno())
    ours.close()       # the reader holds its own copy of the descriptor
    yield kernel, reader
    reader.close()
    kernel.close()


def read_all(reader: N.QueueReader) -> list[bytes]:
    got: list[bytes] = []
    reader.read(lambda p, now: got.append(p), 0.0, 64)
    return got


def test_a_batch_is_handed_on_and_dropped_with_one_verdict(pair):
    kernel, reader = pair
    payloads = [bytes([i]) * (40 + i) for i in range(5)]
    for i, p in enumerate(payloads):
        kernel.send(packet_message(100 + i, p, extra=attr(3, b"\0\0\0\1")))   # a mark
    assert read_all(reader) == payloads
    assert verdicts(kernel) == [(QUEUE, N.NF_DROP, 104)]
    assert reader.malformed == 0
    # nothing read: no verdict
    assert read_all(reader) == []
    assert verdicts(kernel) == []


def test_the_verdict_id_wraps_in_sequence_space(pair):
    kernel, reader = pair
    kernel.send(packet_message(0xFFFFFFFF, b"a"))
    kernel.send(packet_message(0, b"b"))
    assert read_all(reader) == [b"a", b"b"]
    assert verdicts(kernel) == [(QUEUE, N.NF_DROP, 0)]


def with_tail(message: bytes, tail: bytes) -> bytes:
    """``message`` with ``tail`` after its last attribute (its length field to match)."""
    raw = bytearray(message + tail)
    struct.pack_into("=I", raw, 0, len(raw))
    return bytes(raw)


@pytest.mark.parametrize("message", [
    b"",                                                       # nothing: no message
    b"\x05\0\0\0" + bytes(12),                                 # length below the header
    struct.pack("=IHHII", 400, N.NFQNL_MSG_PACKET, 0, 0, 0),   # length beyond the read
    struct.pack("=IHHII", 18, N.NFQNL_MSG_PACKET, 0, 0, 0) + b"\0\0",   # no nfgenmsg
    packet_message(1, b"x")[:-8],                              # an attribute cut short
    with_tail(packet_message(1, b"abcd"), b"\x08\0\3\0"),         # ... after the payload
    struct.pack("=IHHII", 20, 0x0999, 0, 0, 0) + bytes(4),     # another message type
    struct.pack("=IHHII", 28, N.NFQNL_MSG_PACKET, 0, 0, 0) + bytes(4) +
    attr(N.NFQA_PAYLOAD, b"abcd"),                             # no packet id
])
def test_malformed_messages_are_counted_and_skipped(pair, message):
    kernel, reader = pair
    if message:
        kernel.send(message)
    kernel.send(packet_message(9, b"after"))
    assert read_all(reader) == [b"after"]
    assert reader.take_malformed() == (1 if len(message) >= 16 else 0)
    assert verdicts(kernel) == [(QUEUE, N.NF_DROP, 9)]


def test_random_messages_never_stop_the_reader(pair):
    kernel, reader = pair
    rng = random.Random(5)
    good = packet_message(3, b"payload")
    for _ in range(2000):
        msg = bytearray(good)
        for _ in range(rng.randrange(1, 6)):
            msg[rng.randrange(len(msg))] = rng.randrange(256)
        kernel.send(bytes(msg[:rng.randrange(1, len(msg) + 1)]))
        read_all(reader)
    verdicts(kernel)
    kernel.send(good)
    assert read_all(reader) == [b"payload"]
    assert verdicts(kernel) == [(QUEUE, N.NF_DROP, 3)]
