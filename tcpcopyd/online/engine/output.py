"""The packets the fake client sends to the target: data and ACKs, SYNs and resets, each
through ``emit``, which holds back what no interceptd would catch the answer of."""
from __future__ import annotations

from tcpcopyd.net.packet import ACK, RST, SYN, build, timestamp_option
from tcpcopyd.online import counters as C
from tcpcopyd.online.engine.state import EngineState
from tcpcopyd.online.session import TIMESTAMPS, Session


def emit(e: EngineState, pkt: bytearray, s: Session, reset: bool = False) -> None:
    """Send one packet toward the target: only while an interceptd holds the session's
    registration, so that the target's answer is caught (fail-closed). A reset (it draws no
    answer) goes in any case, to free the target's connection. A packet held back is
    counted and sent again by the retransmission timer or when a link comes up
    (``Engine.on_control_up``)."""
    if not (reset or e.control.carries(s)):
        e.counters[C.HELD_NO_LINK] += 1
        return
    if e.sender.send(pkt, s.target_ip):
        e.counters[C.SENT] += 1
    else:
        e.counters[C.SEND_ERRORS] += 1


def send_segment(e: EngineState, s: Session, seq: int, flags: int, payload: bytes) -> None:
    """Client data (or a bare ACK, or a FIN) at ``seq``, acknowledging what the target sent."""
    opts = timestamp_option(s.client_tsval, s.target_tsval) if s.state & TIMESTAMPS else b""
    emit(e, build(s.client_ip, s.target_ip, s.client_port, s.target_port, seq, s.rcv_nxt,
                  ACK | flags, s.client_win, opts, payload, flow=s.flow), s)
    s.need_ack = False


def send_ack(e: EngineState, s: Session) -> None:
    send_segment(e, s, s.snd_nxt, 0, b"")


def send_syn(e: EngineState, s: Session) -> None:
    # a SYN's window is never scaled: offer the largest unscaled one
    emit(e, build(s.client_ip, s.target_ip, s.client_port, s.target_port, s.isn, 0, SYN,
                  65535, s.syn_options, flow=s.flow), s)


def send_reset(e: EngineState, s: Session, seq: int, ack: int = 0, flags: int = 0) -> None:
    """A reset at ``seq``; ``flags``: ACK to acknowledge ``ack`` with it."""
    emit(e, build(s.client_ip, s.target_ip, s.client_port, s.target_port, seq, ack,
                  RST | flags, 0, flow=s.flow), s, reset=True)
