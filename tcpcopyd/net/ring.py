"""The receive ring of a capture socket (PACKET_MMAP, TPACKET_V2; the kernel's
Documentation/networking/packet_mmap.rst): its shape and the header of each of its frames.
``net/capture.py`` gives a socket its ring, ``net/reader.py`` reads it. Compiled
(tcpcopyd/native.py).

The kernel writes each captured packet into the next frame of the ring and hands the frame
to the reader (``TP_STATUS_USER``); the reader hands it back (``TP_STATUS_KERNEL``) once the
packet is read: no system call per packet. A packet larger than a frame (a GRO super-frame,
a jumbo frame) is queued on the socket as well (``TP_STATUS_COPY``) and read from there, in
the same order. Frames are used strictly in turn, so the frames the reader holds are always
one run of the ring.
"""
from __future__ import annotations

import struct
from typing import Final

# linux/if_packet.h
PACKET_RX_RING: Final = 5
PACKET_COPY_THRESH: Final = 7
PACKET_VERSION: Final = 10
TPACKET_V2: Final = 1
TP_STATUS_KERNEL: Final = 0
TP_STATUS_USER: Final = 1
TP_STATUS_COPY: Final = 2

# one frame: its header, the link address, then an IPv4 packet of up to 1 968 bytes (an
# MTU-1500 packet fits; larger ones are read from the socket's queue)
FRAME_SIZE: Final = 2048
# frames in a ring: what a worker may fall behind by before the kernel drops (16 MiB)
FRAMES: Final = 8192
# a block of the ring's memory (a multiple of the page and of FRAME_SIZE): the ring's
# frames lie one after the other in its mapping
BLOCK_SIZE: Final = 1 << 20
RING_BYTES: Final = FRAME_SIZE * FRAMES
# struct tpacket_req: block size, blocks, frame size, frames
REQUEST: Final = struct.Struct("IIII")
# struct tpacket2_hdr: status, length on the wire, length in the frame, offsets of the
# link and network headers in the frame, the kernel's capture time (s, ns)
FRAME_HEAD: Final = struct.Struct("IIIHHII")
STATUS: Final = struct.Struct("I")


def request() -> bytes:
    """The PACKET_RX_RING request for a ring of FRAMES frames."""
    return REQUEST.pack(BLOCK_SIZE, RING_BYTES // BLOCK_SIZE, FRAME_SIZE, FRAMES)
