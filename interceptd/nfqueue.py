"""A worker's reading of its NFQUEUE: the netlink socket of the master's binding read
directly, a packet per message, and one verdict for all the packets of a batch.

NetfilterQueue binds the queue (in the master, see ``interceptd.main``) but gives a verdict
message per packet, and makes a Python object and a callback of each; the kernel also takes
NFQNL_MSG_VERDICT_BATCH, "this verdict for every packet up to this id". So a worker reads
the binding's socket itself and drops a whole batch with one message. Fail-closed as before:
a packet read but not yet given its verdict stays in the kernel's queue (nobody receives
it), and the first batch verdict of the next worker, whose id is higher, drops it too.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable
from typing import Final

# linux/netlink.h
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLMSG_OVERRUN: Final = 4
NLM_F_REQUEST: Final = 1
NLMSG_HEADER: Final = 16     # length u32, type u16, flags u16, sequence u32, port id u32
NLA_HEADER: Final = 4        # length u16, type u16 (host order, like the netlink header)
NLA_TYPE_MASK: Final = 0x3FFF                   # without NLA_F_NESTED, NLA_F_NET_BYTEORDER
# linux/netfilter/nfnetlink.h, nfnetlink_queue.h
NFNL_SUBSYS_QUEUE: Final = 3
NFQNL_MSG_PACKET: Final = NFNL_SUBSYS_QUEUE << 8 | 0
NFQNL_MSG_VERDICT_BATCH: Final = NFNL_SUBSYS_QUEUE << 8 | 3
NFGEN_HEADER: Final = 4      # family u8, version u8, queue number u16 (network order)
NFNETLINK_V0: Final = 0
NFQA_PACKET_HDR: Final = 1                      # packet id (network order), hw protocol, hook
NFQA_VERDICT_HDR: Final = 2
NFQA_PAYLOAD: Final = 10
NF_DROP: Final = 0
# the verdict message: netlink header, nfgenmsg, one NFQA_VERDICT_HDR (verdict, id)
VERDICT_BATCH: Final = struct.Struct("=IHHII" "BBH" "HH" "II")
VERDICT_SIZE: Final = VERDICT_BATCH.size
# most bytes read at once: one message, whose packet is cut to the binding's copy range
RECV_SIZE: Final = 1 << 16


def _u16(data: bytes, at: int) -> int:
    """A host-order (little-endian: x86-64, see shm) 16-bit field."""
    return data[at] | data[at + 1] << 8


def _u32(data: bytes, at: int) -> int:
    return data[at] | data[at + 1] << 8 | data[at + 2] << 16 | data[at + 3] << 24


class QueueReader:
    """Reads one NFQUEUE binding's netlink socket (``fd``, not taken over: a copy of it is
    read), hands each packet's bytes on and drops every packet read, a batch at a time."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=os.dup(fd))
        self.sock.setblocking(False)
        self.malformed = 0     # messages that are not a whole packet message, since taken
        self._queue = -1       # the queue number of the batch's packets
        self._last_id = -1     # the highest packet id of the batch, -1: none yet

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, on_packet: Callable[[bytes, float], None], now: float, budget: int) -> int:
        """Hand on the packets of up to ``budget`` messages (with ``now``), then drop them
        all with one verdict. Returns how many packets were handed on."""
        recv = self.sock.recv
        packets = 0
        try:
            for _ in range(budget):
                try:
                    data = recv(RECV_SIZE)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno != errno.ENOBUFS:
                        raise
                    # the kernel could not queue a message to us: that packet was dropped
                    # (fail-closed; the queue's drops count it, see queue_drops); reading
                    # goes on
                    continue
                packets += self._messages(data, on_packet, now)
        finally:
            self.flush()
        return packets

    def _messages(self, data: bytes, on_packet: Callable[[bytes, float], None],
                  now: float) -> int:
        """The netlink messages of one read."""
        packets = 0
        at = 0
        n = len(data)
        while at + NLMSG_HEADER <= n:
            length = _u32(data, at)
            kind = _u16(data, at + 4)
            if length < NLMSG_HEADER or at + length > n:
                self.malformed += 1
                return packets
            if kind == NFQNL_MSG_PACKET:
                payload = self._packet(data, at + NLMSG_HEADER, at + length)
                if payload is None:
                    self.malformed += 1
                else:
                    packets += 1
                    on_packet(payload, now)
            elif kind != NLMSG_ERROR and kind != NLMSG_DONE and kind != NLMSG_OVERRUN:
                self.malformed += 1
            at += (length + 3) & ~3
        return packets

    def _packet(self, data: bytes, at: int, end: int) -> bytes | None:
        """A packet message's payload; its id joins the batch. None: not a whole one."""
        if at + NFGEN_HEADER > end:
            return None
        queue = data[at + 2] << 8 | data[at + 3]
        at += NFGEN_HEADER
        packet_id = -1
        payload: bytes | None = None
        while at + NLA_HEADER <= end:
            alen = _u16(data, at)
            atype = _u16(data, at + 2) & NLA_TYPE_MASK
            if alen < NLA_HEADER or at + alen > end:
                return None
            if atype == NFQA_PACKET_HDR and alen >= NLA_HEADER + 4:
                packet_id = int.from_bytes(data[at + NLA_HEADER:at + NLA_HEADER + 4], "big")
            elif atype == NFQA_PAYLOAD:
                payload = data[at + NLA_HEADER:at + alen]
            at += (alen + 3) & ~3
        if packet_id < 0:
            return None
        if queue != self._queue and self._last_id >= 0:
            self.flush()      # (one binding is one queue: only a bug would change it)
        self._queue = queue
        self._last_id = packet_id
        return payload

    def flush(self) -> None:
        """Drop every packet of the batch (and any earlier one still queued)."""
        if self._last_id < 0:
            return
        msg = VERDICT_BATCH.pack(VERDICT_SIZE, NFQNL_MSG_VERDICT_BATCH, NLM_F_REQUEST, 0, 0,
                                 socket.AF_UNSPEC, NFNETLINK_V0, socket.htons(self._queue),
                                 8 + 4, NFQA_VERDICT_HDR,
                                 socket.htonl(NF_DROP), socket.htonl(self._last_id))
        self._last_id = -1
        try:
            self.sock.send(msg)
        except BlockingIOError:
            # the kernel's receive side of netlink is never full for long; the packets
            # stay queued (fail-closed) and the next batch's verdict covers them
            pass

    def take_malformed(self) -> int:
        n, self.malformed = self.malformed, 0
        return n

    def close(self) -> None:
        self.sock.close()
