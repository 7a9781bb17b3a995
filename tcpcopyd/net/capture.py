"""AF_PACKET capture of client->server packets, one socket per worker in a fanout group
(and of the target's replies, for interceptd's assistant mode): the socket and its filter.
Reading it is ``tcpcopyd.net.reader``; a worker's capture socket has a receive ring
(``tcpcopyd.net.ring``) which each worker process maps for itself (``map_ring``).

The socket is SOCK_DGRAM (the kernel strips the link header, we read IP packets), bound
to one interface, ignores packets the host sends itself, and carries a classic BPF filter
that passes only TCP (non-fragment) packets whose destination port is a service port. With
IPv6 it takes every protocol and the filter passes IPv4 and IPv6 alike: an IPv6 packet
with its TCP header right behind the IPv6 header, or behind one extension header (which
the engine follows, or counts as not followed: a fragment); longer chains are dropped.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import socket
import struct

from tcpcopyd.net import packet as P
from tcpcopyd.net import ring as R
from tcpcopyd.net.errors import CaptureError

# linux/if_ether.h
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ALL = 0x0003
# classic BPF ancillary data: the packet's protocol (linux/filter.h SKF_AD_OFF + 0)
SKF_AD_PROTOCOL = 0xFFFFF000
# and the index of the interface it arrived on (SKF_AD_OFF + SKF_AD_IFINDEX)
SKF_AD_IFINDEX = 0xFFFFF008
# linux/if_packet.h socket options
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_STATISTICS = 6
PACKET_FANOUT = 18
PACKET_IGNORE_OUTGOING = 23
PACKET_FANOUT_HASH = 0
PACKET_FANOUT_FLAG_DEFRAG = 0x8000
# asm-generic/socket.h
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33

# classic BPF opcodes (linux/filter.h)
BPF_LD_W_ABS = 0x20
BPF_LD_B_ABS = 0x30
BPF_LD_H_ABS = 0x28
BPF_LD_B_IND = 0x50
BPF_LD_H_IND = 0x48
BPF_LDX_B_MSH = 0xB1
BPF_LDX_IMM = 0x01
BPF_LDX_MEM = 0x61
BPF_ST = 0x02
BPF_STX = 0x03
BPF_AND_K = 0x54
BPF_RSH_K = 0x74
BPF_LSH_K = 0x64
BPF_ADD_K = 0x04
BPF_ADD_X = 0x0C
BPF_TAX = 0x07
BPF_JA = 0x05
BPF_JEQ_K = 0x15
BPF_JSET_K = 0x45
BPF_JGT_X = 0x2D
BPF_RET_K = 0x06
# TCP flags that make a segment matter to the engine even without payload
FIN_SYN_RST = 0x07
# snap length returned by an accepting filter: the whole packet
ACCEPT = 0x40000
# most instructions in a socket filter (linux/filter.h)
BPF_MAXINSNS = 4096


def check_interface(name: str) -> str | None:
    """An error message if the interface does not exist."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        ifaces = ", ".join(sorted(os.listdir("/sys/class/net"))) if os.path.isdir(
            "/sys/class/net") else "?"
        return f"interface {name!r} does not exist (present: {ifaces})"
    return None


class _SockFprog(ctypes.Structure):
    """struct sock_fprog (linux/filter.h): a classic BPF program for SO_ATTACH_FILTER."""
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


# the client segments the engine has no use for: a pure ACK (no payload, no SYN, FIN or
# RST) moves nothing toward the target — the copy's own ACKs follow the target's replies
SKIP_PURE_ACKS = [
    (BPF_LD_B_IND, 0, 0, P.TCP_FLAGS),   # A = tcp flags
    (BPF_JSET_K, 8, 0, FIN_SYN_RST),     # SYN, FIN or RST? to the port check, else
    (BPF_LD_B_IND, 0, 0, P.TCP_DATA_OFFSET),   # A = tcp data offset << 4
    (BPF_AND_K, 0, 0, 0xF0),
    (BPF_RSH_K, 0, 0, 2),                # A = tcp header length
    (BPF_ADD_X, 0, 0, 0),                # A = ip + tcp header length
    (BPF_TAX, 0, 0, 0),                  # X = A
    (BPF_LD_H_ABS, 0, 0, P.IP_TOTAL_LENGTH),   # A = ip total length
    (BPF_JGT_X, 1, 0, 0),                # a payload? to the port check, else
    (BPF_RET_K, 0, 0, 0),                #   drop: a pure ACK
    (BPF_LDX_B_MSH, 0, 0, 0),            # X = ip header length (again)
]


# the IPv6 extension headers the filter looks behind (one of them; their length is
# (second byte + 1) x 8, which a fragment header's reserved 0 makes its 8)
EXTENSIONS6 = (P.IP6_HOP_BY_HOP, P.IP6_ROUTING, P.IP6_FRAGMENT, P.IP6_DEST_OPTIONS)


def interface_test(indexes: list[int]) -> list[tuple[int, int, int, int]]:
    """A socket bound to every interface (a set of them: -i 'veth*') passes on only the
    packets of these (by their index; none: nothing)."""
    prog = [(BPF_LD_W_ABS, 0, 0, SKF_AD_IFINDEX)]     # A = the interface's index
    for i, index in enumerate(indexes):
        # this one? past the other tests and the drop, else the next test
        prog += [(BPF_JEQ_K, 0, 1, index), (BPF_JA, 0, 0, 2 * (len(indexes) - 1 - i) + 1)]
    prog.append((BPF_RET_K, 0, 0, 0))
    return prog


def capture_filter(ports: list[int], source: bool = False, answers: bool = False,
                   ipv6: bool = False, interfaces: list[int] | None = None
                   ) -> list[tuple[int, int, int, int]]:
    """``bpf_program``, behind the test of the interfaces of a set if given."""
    prog = bpf_program(ports, source, answers, ipv6)
    if interfaces is None:
        return prog
    if len(prog) + 2 * len(interfaces) + 2 > BPF_MAXINSNS:
        raise ValueError(f"{len(interfaces)} interfaces are more than a socket filter can "
                         "take")
    return interface_test(interfaces) + prog


def bpf_program(ports: list[int], source: bool = False, answers: bool = False,
                ipv6: bool = False) -> list[tuple[int, int, int, int]]:
    """Instructions (code, jt, jf, k) accepting the client's TCP segments to any of
    ``ports`` (network layer) that carry a payload, SYN, FIN or RST; ``source``: every
    TCP segment from any of them (interceptd's assistant mode, which needs the target's
    ACKs); ``answers``: the server's segments from them that carry a payload, SYN, FIN or
    RST (the comparison test); ``ipv6``: IPv6 ones as well (the socket takes every
    protocol). Every port's test jumps at most one instruction ahead, so any number of
    ports fits (up to BPF_MAXINSNS)."""
    ports = list(dict.fromkeys(ports))
    if not ports:
        raise ValueError("no service ports")
    if 40 + 4 * len(ports) > BPF_MAXINSNS:
        raise ValueError(f"{len(ports)} ports are more than a socket filter can take")
    v4 = _program4(ports, source, answers)
    if not (answers or ipv6):
        return v4                            # the socket takes IPv4 only
    v6 = _program6(ports, source, answers) if ipv6 else [(BPF_RET_K, 0, 0, 0)]
    return [
        # a socket of every protocol (outgoing packets reach only those)
        (BPF_LD_H_ABS, 0, 0, SKF_AD_PROTOCOL),   # A = the packet's protocol
        (BPF_JEQ_K, 3, 0, ETH_P_IP),             # IPv4? to its program, else
        (BPF_JEQ_K, 0, 1, ETH_P_IPV6),           # IPv6? to its program (past IPv4's)
        (BPF_JA, 0, 0, len(v4) + 1),
        (BPF_RET_K, 0, 0, 0),                    # neither: drop
        *v4,
        *v6,
    ]


def _ports(ports: list[int], field: int) -> list[tuple[int, int, int, int]]:
    """The port test (X: the TCP header's offset): accept if the port at ``field`` is
    one of ``ports``, else drop."""
    prog = [(BPF_LD_H_IND, 0, 0, field)]     # A = port
    for port in ports:
        prog.append((BPF_JEQ_K, 0, 1, port))     # this port? accept, else the next
        prog.append((BPF_RET_K, 0, 0, ACCEPT))
    prog.append((BPF_RET_K, 0, 0, 0))        # none of them: drop
    return prog


def _program6(ports: list[int], source: bool, answers: bool
              ) -> list[tuple[int, int, int, int]]:
    """The IPv6 part of ``bpf_program``."""
    prog = [
        (BPF_LDX_IMM, 0, 0, P.IP6_HEADER),       # X = 40: the TCP header's offset
        (BPF_LD_B_ABS, 0, 0, P.IP6_NEXT_HEADER),     # A = next header
        (BPF_JEQ_K, 2 + len(EXTENSIONS6) + 7, 0, P.IPPROTO_TCP),   # TCP? to its test
    ]
    for i, kind in enumerate(EXTENSIONS6):       # an extension header? look behind it
        prog.append((BPF_JEQ_K, len(EXTENSIONS6) - i, 0, kind))
    prog += [
        (BPF_RET_K, 0, 0, 0),                    # anything else: drop
        (BPF_LD_B_ABS, 0, 0, P.IP6_HEADER + 1),  # A = its length field
        (BPF_ADD_K, 0, 0, 1),
        (BPF_LSH_K, 0, 0, 3),
        (BPF_ADD_K, 0, 0, P.IP6_HEADER),
        (BPF_TAX, 0, 0, 0),                      # X = 40 + its length
        (BPF_LD_B_ABS, 0, 0, P.IP6_HEADER),      # A = the next header behind it
        (BPF_JEQ_K, 1, 0, P.IPPROTO_TCP),        # TCP? to its test, else
        (BPF_RET_K, 0, 0, 0),                    #   drop: a longer chain
    ]
    if not source or answers:
        prog += [
            (BPF_STX, 0, 0, 1),                  # M[1] = the TCP header's offset
            (BPF_LD_B_IND, 0, 0, P.TCP_FLAGS),   # A = tcp flags
            (BPF_JSET_K, 11, 0, FIN_SYN_RST),    # SYN, FIN or RST? to the port test
            (BPF_LD_B_IND, 0, 0, P.TCP_DATA_OFFSET),   # A = tcp data offset << 4
            (BPF_AND_K, 0, 0, 0xF0),
            (BPF_RSH_K, 0, 0, 2),                # A = tcp header length
            (BPF_ADD_X, 0, 0, 0),                # A = where the payload begins
            (BPF_ST, 0, 0, 0),                   # M[0] = A
            (BPF_LD_H_ABS, 0, 0, P.IP6_PAYLOAD_LENGTH),   # A = payload length
            (BPF_JEQ_K, 4, 0, 0),                # 0 (a jumbogram, BIG TCP GRO)? on
            (BPF_ADD_K, 0, 0, P.IP6_HEADER),     # A = where the packet ends
            (BPF_LDX_MEM, 0, 0, 0),              # X = M[0]
            (BPF_JGT_X, 1, 0, 0),                # a payload? to the port test, else
            (BPF_RET_K, 0, 0, 0),                #   drop: a pure ACK
            (BPF_LDX_MEM, 0, 0, 1),              # X = the TCP header's offset (again)
        ]
    return prog + _ports(ports, P.TCP_SPORT if source or answers else P.TCP_DPORT)


def _program4(ports: list[int], source: bool, answers: bool
              ) -> list[tuple[int, int, int, int]]:
    """The IPv4 part of ``bpf_program``."""
    return [
        (BPF_LD_B_ABS, 0, 0, P.IP_PROTOCOL),     # A = ip protocol
        (BPF_JEQ_K, 1, 0, P.IPPROTO_TCP),        # TCP? on, else
        (BPF_RET_K, 0, 0, 0),                #   drop
        (BPF_LD_H_ABS, 0, 0, P.IPV4.offset("fragment")),   # A = flags/fragment offset
        (BPF_JSET_K, 0, 1, 0x1FFF),          # a fragment (not the first)?
        (BPF_RET_K, 0, 0, 0),                #   drop
        (BPF_LDX_B_MSH, 0, 0, 0),            # X = ip header length
        *([] if source and not answers else SKIP_PURE_ACKS),
        *_ports(ports, P.TCP_SPORT if source or answers else P.TCP_DPORT),
    ]


def attach_filter(sock: socket.socket, prog: list[tuple[int, int, int, int]]) -> None:
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw)
    fprog = _SockFprog(len(prog), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))


def open_capture(iface: str, ports: list[int], fanout_group: int | None,
                 rcvbuf: int = 32 << 20, source: bool = False,
                 answers: bool = False, ring: bool = False,
                 ipv6: bool = False, promisc: bool = False,
                 interfaces: list[int] | None = None) -> socket.socket:
    """An AF_PACKET socket on ``iface`` delivering client packets to ``ports`` (or, with
    ``source``, server packets from them; with ``answers``, the online server's answers,
    which this host sends: the only socket that does not ignore outgoing packets); with
    ``ring``, a receive ring (``tcpcopyd.net.ring``) that the reader maps; with
    ``promisc``, the interface in promiscuous mode while the socket is open (a SPAN
    port delivers frames addressed to other hosts). With ``interfaces`` (the indexes a
    set ``iface`` matches now), the socket takes every interface and its filter only
    those (``set_interfaces`` changes them)."""
    if interfaces is None:
        try:
            socket.if_nametoindex(iface)
        except OSError:
            raise CaptureError(f"interface {iface!r} does not exist (see `ip link`)") \
                from None
    try:
        # outgoing packets (the online server's answers) reach only ETH_P_ALL sockets
        proto = ETH_P_ALL if answers or ipv6 else ETH_P_IP
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(proto))
    except PermissionError:
        raise CaptureError("AF_PACKET capture needs root (or CAP_NET_RAW)") from None
    try:
        attach_filter(sock, capture_filter(ports, source, answers, ipv6, interfaces))
        if not answers:
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if interfaces is None:      # a set: not bound, the filter chooses
            sock.bind((iface, proto))
        if promisc:
            for index in interfaces or [socket.if_nametoindex(iface)]:
                promiscuous(sock, index)
        if ring:
            add_ring(sock)
        if fanout_group is not None:
            join_fanout(sock, fanout_group)
        # drain what arrived before the filter was attached
        sock.setblocking(False)
        try:
            while True:
                sock.recv(65536)
        except BlockingIOError:
            pass
        stats(sock)  # reset the kernel's counters
    except OSError as e:
        sock.close()
        raise CaptureError(f"capture on {iface}: {e.strerror or e}") from e
    return sock


def promiscuous(sock: socket.socket, index: int) -> None:
    """Interface ``index`` in promiscuous mode while ``sock`` is open (struct packet_mreq:
    ifindex, type, address length, address)."""
    sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP,
                    struct.pack("iHH8s", index, PACKET_MR_PROMISC, 0, b""))


def add_ring(sock: socket.socket) -> None:
    """Give the socket its receive ring; packets larger than a frame go to its queue."""
    try:
        sock.setsockopt(SOL_PACKET, R.PACKET_VERSION, R.TPACKET_V2)
        sock.setsockopt(SOL_PACKET, R.PACKET_RX_RING, R.request())
    except OSError as e:
        raise CaptureError(f"a receive ring of {R.RING_BYTES >> 20} MiB: "
                           f"{e.strerror or e}") from e
    sock.setsockopt(SOL_PACKET, R.PACKET_COPY_THRESH, 1)


def map_ring(sock: socket.socket) -> mmap.mmap:
    """This process's mapping of the socket's receive ring."""
    return mmap.mmap(sock.fileno(), R.RING_BYTES)


def join_fanout(sock: socket.socket, group: int) -> None:
    mode = PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG
    sock.setsockopt(SOL_PACKET, PACKET_FANOUT,
                    struct.pack("I", (group & 0xFFFF) | (mode << 16)))


def stats(sock: socket.socket) -> tuple[int, int]:
    """(packets, drops) since the last call (the kernel resets them on read)."""
    raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
    return struct.unpack("II", raw)
