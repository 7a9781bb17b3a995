"""The session engine (``Engine``, in core), in parts: admission (captured segments into
sessions), stream (the client's stream and the buffer budget), replies (the target's
side), transmit (sending, pacing, retransmission), closing (how sessions end), output (the
packets sent), persist (the shm table), over the state they share (state)."""
from tcpcopyd.online.engine.core import Engine
from tcpcopyd.online.engine.state import MAX_OUT_OF_ORDER, SEGMENT_COST, sampled

__all__ = ["Engine", "MAX_OUT_OF_ORDER", "SEGMENT_COST", "sampled"]
