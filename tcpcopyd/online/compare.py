"""The comparison test (``compare = true``): every exchange of a copied connection — a
request and the answer to it, in any TCP protocol — seen on both sides: the online server's
answer (captured on the online host, server to client) and the target's (its replies, with
the first bytes of each answer from interceptd).

An exchange is a run of client data sent with one acknowledgement number: a client that
sends again after it received more of the answer begins the next one (pipelined requests
stay one exchange). It is known by the client sequence number of its first byte — the same
on both sides, since the copy keeps the client's sequence numbers — and an answer segment
belongs to the exchange its acknowledgement number reaches into. So the two sides pair
exactly, whatever order the capture, the control link and the two capture sockets deliver
their packets in.

Each side records the time of the request's last byte (online: seen by the capture;
target: sent by tcpcopyd), the answer's first and last byte, its size and its first bytes
(PREFIX). An exchange is over when both sides have seen an answer to a later one, when the
connection ends, or after PAIR_WAIT of quiet; it is then handed on (``emit``): the worker
puts it in its shm ring, the master writes it to ``compare_log``."""
from __future__ import annotations

import time
from collections import OrderedDict

from tcpcopyd.net.packet import segment_span, seq_add, seq_lt
from tcpcopyd.online.targets import Targets, target_for

# bytes of a request and of an answer kept
REQUEST_PREFIX = 128
PREFIX = 256
# a connection quiet for this long has its exchanges handed on as they are, seconds
PAIR_WAIT = 30.0
# connections followed at once, per worker (the oldest is handed on and forgotten)
MAX_CONNECTIONS = 65536
# exchanges waiting for their other side — the target, paced by its answers, may be far
# behind a fast client — per connection and per worker (beyond: the oldest go on alone)
MAX_PENDING = 4096
MAX_EXCHANGES = 100_000
# answers read before the request they answer (two sockets: the answers' may be read
# first), per connection, until that request is read
MAX_EARLY = 64


class Side:
    """One side's view of an exchange."""

    __slots__ = ("req_end", "first", "last", "size", "prefix")

    def __init__(self, now: float) -> None:
        self.req_end = now          # the request's last byte (seen or sent)
        self.first = 0.0            # the answer's first byte (0: none yet)
        self.last = 0.0
        self.size = 0
        self.prefix = b""

    def answer(self, nbytes: int, prefix: bytes, now: float) -> None:
        if not self.first:
            self.first = now
        self.last = now
        self.size += nbytes
        if prefix and len(self.prefix) < PREFIX:
            self.prefix += prefix[:PREFIX - len(self.prefix)]

    def summary(self) -> dict:
        return {"size": self.size, "first": self.prefix,
                "ttfb_ms": round((self.first - self.req_end) * 1000, 3) if self.first else None,
                "ttlb_ms": round((self.last - self.req_end) * 1000, 3) if self.first else None}


class Exchange:
    """One request (a run of client data sent with one acknowledgement number) and each side's
    answer to it."""
    __slots__ = ("start", "end", "ack", "request", "online", "target")

    def __init__(self, start: int, ack: int | None) -> None:
        self.start = start          # client sequence number of the request's first byte
        self.end = start            # and of the byte after its last, as far as seen
        self.ack = ack              # the client's acknowledgement with it (online)
        self.request = b""          # its first bytes (``extend`` adds them)
        self.online: Side | None = None
        self.target: Side | None = None

    def extend(self, seq: int, nbytes: int, payload: bytes) -> bool:
        """Take client data at ``seq``; whether it brought new bytes."""
        end = seq_add(seq, nbytes)
        if not seq_lt(self.end, end):
            return False
        if seq == self.end and len(self.request) < REQUEST_PREFIX:
            self.request += payload[:REQUEST_PREFIX - len(self.request)]
        self.end = end
        return True

    def holds(self, seq: int) -> bool:
        return not seq_lt(seq, self.start) and seq_lt(seq, self.end)


class Conversation:
    """One copied connection: its exchanges, oldest first."""

    __slots__ = ("exchanges", "index", "touched", "server_next", "target_next", "early")

    def __init__(self, now: float) -> None:
        self.exchanges: list[Exchange] = []
        self.early: list[tuple] = []          # online answers to requests not read yet
        self.index = 0                # exchanges handed on so far
        self.touched = now
        self.server_next: int | None = None   # the online server's next new byte
        self.target_next: int | None = None   # the target's next new byte

    def answered_by(self, ack: int) -> Exchange | None:
        """The exchange an answer acknowledging ``ack`` belongs to: the last one whose
        request began before it."""
        for ex in reversed(self.exchanges):
            if seq_lt(ex.start, ack):
                return ex
        return None


class Exchanges:
    """The exchanges of every copied connection of one worker, paired side by side: the
    engine's observer (tcpcopyd.online.engine.state.Observer) for the client's data and
    the target's side, and the worker's reader of the online server's answers."""

    def __init__(self, emit, targets: Targets, request_clock=None, answer_clock=None) -> None:
        """``emit(record)`` takes each finished exchange (a dict); ``targets``: where the
        sessions are copied to (the worker sets it again after a reload);
        ``request_clock()``/``answer_clock()``: when the packet just read was captured
        (the kernel's time, on the monotonic scale), else when it is handled."""
        self.emit = emit
        self.targets = targets
        self.request_clock = request_clock or time.monotonic
        self.answer_clock = answer_clock or time.monotonic
        self.conversations: OrderedDict[tuple, Conversation] = OrderedDict()
        self.copied: set[tuple] = set()   # the sessions the engine has open (first copies)
        self.pending = 0            # exchanges held, all connections
        self.answers_lost = 0       # online answers dropped: MAX_EARLY of them were waiting
        self.wall_offset = time.time() - time.monotonic()

    def _conv(self, key: tuple, now: float, create: bool) -> Conversation | None:
        c = self.conversations.get(key)
        if c is None:
            if not create:
                return None
            if len(self.conversations) >= MAX_CONNECTIONS:
                old_key, old = self.conversations.popitem(last=False)
                self._finish(old_key, old, len(old.exchanges))
            c = self.conversations[key] = Conversation(now)
        else:
            self.conversations.move_to_end(key)
        c.touched = now
        return c

    # ------------------------------------------------------------ online (the capture)
    def opened(self, key: tuple) -> None:
        self.copied.add(key)

    def client_data(self, key: tuple, seq: int, ack: int, payload: bytes) -> None:
        """Client data of a copied session, as the engine had it from the capture."""
        self.online_request(key, seq, ack, len(payload), payload[:REQUEST_PREFIX],
                            self.request_clock())

    def answer_packet(self, buf, n: int) -> bool:
        """A captured packet of the online server's answer; whether it answers client data
        not read yet (it waits for it: the caller reads the capture before more answers)."""
        f = segment_span(buf, n)
        if f is None or f[7] <= f[6]:
            return False
        src, dst, sport, dport, seq, ack, start, end = f
        target = target_for(self.targets, src, sport)
        if target is None:
            return False
        key = (dst, dport, target[0], target[1])
        if key in self.conversations or key in self.copied:
            return self.online_answer(key, seq, ack, end - start,
                                      bytes(buf[start:min(end, start + PREFIX)]),
                                      self.answer_clock())
        return False

    def online_request(self, key: tuple, seq: int, ack: int, nbytes: int, payload: bytes,
                       now: float) -> None:
        """``nbytes`` of client data at ``seq``, acknowledging ``ack`` (``payload``: its
        first bytes)."""
        c = self._conv(key, now, create=True)
        ex, grew = self._request(key, c, seq, nbytes, payload, ack)
        if ex is None:
            return
        if ex.online is None:
            ex.online = Side(now)
        elif grew:
            ex.online.req_end = now       # its last byte so far
        if c.early and ex is c.exchanges[-1]:
            ready = [a for a in c.early if not seq_lt(ex.end, a[1])]
            c.early = [a for a in c.early if seq_lt(ex.end, a[1])]
            for a in ready:
                self._online_answer(key, c, *a)

    def online_answer(self, key: tuple, seq: int, ack: int, nbytes: int, payload: bytes,
                      now: float) -> bool:
        """Whether the answer waits for client data not read yet."""
        c = self._conv(key, now, create=True)
        last = c.exchanges[-1] if c.exchanges else None
        if last is None or seq_lt(last.end, ack):
            # it answers client data not read yet: it waits for it
            if len(c.early) < MAX_EARLY:
                c.early.append((seq, ack, nbytes, payload, now))
            else:
                self.answers_lost += 1
            return True
        self._online_answer(key, c, seq, ack, nbytes, payload, now)
        return False

    def _online_answer(self, key: tuple, c: Conversation, seq: int, ack: int, nbytes: int,
                       payload: bytes, now: float) -> None:
        if not self._new(c, "server_next", seq, nbytes):
            return
        ex = c.answered_by(ack)
        if ex is not None and ex.online is not None:
            ex.online.answer(nbytes, payload, now)
            self._settle(key, c, ex, "online")

    # ------------------------------------------------------------ target (the copy)
    def target_request(self, key: tuple, seq: int, payload: bytes, now: float) -> None:
        """A segment of client data sent to the target for the first time."""
        c = self._conv(key, now, create=True)
        ex = next((e for e in reversed(c.exchanges) if e.holds(seq)), None)
        if ex is None:          # the capture of it was missed: the target's side alone
            ex, _ = self._request(key, c, seq, len(payload), payload, None)
            if ex is None:
                return
        if ex.target is None:
            ex.target = Side(now)
        else:
            ex.target.req_end = now

    def target_answer(self, key: tuple, seq: int, ack: int, nbytes: int, prefix: bytes,
                      now: float) -> None:
        c = self._conv(key, now, create=False)
        if c is None or not self._new(c, "target_next", seq, nbytes):
            return
        ex = c.answered_by(ack)
        if ex is not None and ex.target is not None:
            ex.target.answer(nbytes, prefix, now)
            self._settle(key, c, ex, "target")

    # ------------------------------------------------------------ exchanges
    @staticmethod
    def _new(c: Conversation, attr: str, seq: int, nbytes: int) -> bool:
        """Whether answer bytes at ``seq`` are new (not a retransmission)."""
        expected = getattr(c, attr)
        end = seq_add(seq, nbytes)
        if expected is not None and not seq_lt(expected, end):
            return False
        setattr(c, attr, end)
        return True

    def _request(self, key: tuple, c: Conversation, seq: int, nbytes: int, payload: bytes,
                 ack: int | None) -> tuple[Exchange | None, bool]:
        """The exchange client data at ``seq`` belongs to — the last one if it goes on
        with the same acknowledgement, else a new one (None: old data, handed on) — and
        whether the data was new."""
        last = c.exchanges[-1] if c.exchanges else None
        if last is not None:
            if last.holds(seq) or (not seq_lt(seq, last.start) and (
                    ack is None or last.ack is None or ack == last.ack)):
                return last, last.extend(seq, nbytes, payload)
            if seq_lt(seq, last.start):
                return next((e for e in c.exchanges if e.holds(seq)), None), False
        ex = Exchange(seq, ack)
        ex.extend(seq, nbytes, payload)
        c.exchanges.append(ex)
        self.pending += 1
        if len(c.exchanges) > MAX_PENDING:
            self._finish(key, c, 1)
        if self.pending > MAX_EXCHANGES:
            old_key, old = next(iter(self.conversations.items()))
            self._finish(old_key, old, max(1, len(old.exchanges) // 2))
        return ex, True

    def _settle(self, key: tuple, c: Conversation, ex: Exchange, side: str) -> None:
        """An answer to ``ex`` came on ``side``: an exchange before it is over once later
        ones have answers on both sides; those go on."""
        before = c.exchanges.index(ex)
        done = 0
        while done < before:
            later = c.exchanges[done + 1:]
            if not (any(x.online is not None and x.online.first for x in later)
                    and any(x.target is not None and x.target.first for x in later)):
                break
            done += 1
        self._finish(key, c, done)

    def _finish(self, key: tuple, c: Conversation, count: int) -> None:
        for _ in range(min(count, len(c.exchanges))):
            self.pending -= 1
            self._hand_on(c.exchanges.pop(0), c, key)

    def _hand_on(self, ex: Exchange, c: Conversation, key: tuple) -> None:
        if ex.online is None and ex.target is None:
            return
        c.index += 1
        start = (ex.online or ex.target).req_end
        self.emit({"ts": round(start + self.wall_offset, 6), "key": key, "n": c.index,
                   "request": ex.request,
                   "online": ex.online.summary() if ex.online else None,
                   "target": ex.target.summary() if ex.target else None})

    def closed(self, key: tuple) -> None:
        """The copy's session ended: what is left of the connection goes on."""
        self.copied.discard(key)
        c = self.conversations.pop(key, None)
        if c is not None:
            self._finish(key, c, len(c.exchanges))

    def sweep(self, now: float) -> None:
        """Connections quiet for PAIR_WAIT: hand on what they have."""
        limit = now - PAIR_WAIT
        while self.conversations:
            key, c = next(iter(self.conversations.items()))
            if c.touched >= limit:
                break
            del self.conversations[key]
            self._finish(key, c, len(c.exchanges))
