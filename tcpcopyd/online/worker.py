"""A tcpcopyd worker: reads its capture socket, runs the session engine, talks to
interceptd, and keeps its shm record (counters, heartbeat) fresh."""
from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections.abc import Callable

from shm.segment import (
    POOL_ALONE,
    POOL_PARKED,
    POOL_RETIRING,
    POOL_SHARED,
    LinkState,
    Segment,
    pack_sources,
)
from shm.seqlock import TornRead
from shm.table import SlotTable
from tcpcopyd.net import capture
from tcpcopyd.net.netlink import InterfaceFollower, LinkWatch, is_interface_set
from tcpcopyd.net.packet import packed
from tcpcopyd.net.reader import INTERFACE_GONE, CaptureReader, packet_time
from tcpcopyd.net.sender import RawSender
from tcpcopyd.online import comparelog, loop
from tcpcopyd.online import counters as C
from tcpcopyd.online.compare import Exchanges
from tcpcopyd.online.control import ControlGroup
from tcpcopyd.online.engine import Engine
from tcpcopyd.online.loop import CAPTURE_BATCH, WORK_SLICE
from tcpcopyd.online.mirror import MirrorWatch
from tcpcopyd.online.options import Settings
from tcpcopyd.online.rewrite import Rewrite, expand_pool
from tcpcopyd.online.session import SLOT
from tcpcopyd.online.strays import Inboxes, Strays
from tcpcopyd.online.targets import targets_of
from tcpcopyd.service import worker as service_worker
from tcpcopyd.service.reload import SettingsWatch

log = logging.getLogger("tcpcopyd.worker")

# how often a worker of a pool that grows and shrinks takes its share of -m again, seconds
SHARE_INTERVAL = 1.0


def rewrite_for(cfg: Settings, worker: int, workers: int) -> Rewrite | None:
    """Who the target sees (-n, -f, -c, -H); None: the clients themselves."""
    if cfg.copies == 1 and cfg.port_block is None and not cfg.client_pool \
            and not cfg.localhost_as:
        return None
    targets = {t.target_ip for t in cfg.transfer}
    return Rewrite(cfg.copies, cfg.port_block or 0,
                   expand_pool(cfg.client_pool or [], targets),
                   packed(cfg.localhost_as) if cfg.localhost_as else None,
                   worker, workers)


def captured(cfg: Settings) -> tuple[list[int], bool]:
    """What the capture sockets take: the rules' ports, and whether IPv6 too."""
    return [t.port for t in cfg.transfer], any(t.ipv6 for t in cfg.transfer)


def engine_for(cfg: Settings, control: ControlGroup, table, slots: range, worker: int,
               workers: int) -> Engine:
    """The session engine with the settings of ``cfg`` (online capture and offline replay)."""
    ipv6 = captured(cfg)[1]
    return Engine(targets_of(cfg.transfer), RawSender(ipv6=ipv6), control, table, slots,
                  rewrite=rewrite_for(cfg, worker, workers),
                  ramp_from=time.monotonic() if cfg.ramp else None,
                  mtu=cfg.mtu, fake_mss=cfg.mss, idle_timeout=cfg.timeout,
                  keepalive_timeout=cfg.keepalive_timeout,
                  pace_timeout=0.0 if cfg.no_wait else cfg.pace_timeout,
                  max_session_buffer=cfg.session_buffer, max_total_buffer=cfg.total_buffer,
                  sample_rate=cfg.sample_rate, only_syn=cfg.only_syn,
                  initial_rtt=cfg.rtt / 1000 if cfg.rtt else None,
                  max_memory=(cfg.memory << 20) // workers)


def apply_live(engine: Engine, cfg: Settings, reader: CaptureReader | None = None
               ) -> None:
    """Settings a reload changed; they apply to new sessions (timeouts to all)."""
    if reader is not None:
        reader.max_lag = cfg.max_lag
    engine.idle_timeout = cfg.timeout
    engine.keepalive_timeout = cfg.keepalive_timeout
    engine.pace_timeout = 0.0 if cfg.no_wait else cfg.pace_timeout
    engine.sample_rate = cfg.sample_rate
    engine.targets = targets_of(cfg.transfer)
    log.info("worker applied the reloaded settings: sample_rate=%d%%, timeout=%gs",
             cfg.sample_rate, cfg.timeout)


class CaptureWorker(service_worker.WorkerProcess):
    """One capture socket of the fanout group, its sessions and its control links."""

    def __init__(self, cfg: Settings, index: int, cpu: int, seg: Segment,
                 sockets: list[socket.socket | None],
                 answers: list[socket.socket | None] = (),
                 rings: comparelog.Rings | None = None, n_workers: int | None = None,
                 inboxes: Inboxes | None = None, strays_at: int = 0) -> None:
        """``sockets``: every worker's capture socket (the child keeps its own; None: a
        worker index not in the pool now); ``answers``: every worker's socket of the online
        server's answers, ``rings``: the rings of its records to the master (the
        comparison test); ``n_workers``: the most workers (default: ``cfg.workers``);
        ``inboxes``: a pool that grows and shrinks (workers = auto), its key table at
        ``strays_at`` in the segment."""
        super().__init__(index, n_workers or cfg.workers, cpu, seg)
        self.cfg = cfg
        self.sockets = sockets
        self.answer_sockets = answers
        self.rings = rings
        self.inboxes = inboxes
        self.pooled = inboxes is not None
        self.strays_at = strays_at
        self.strays: Strays | None = None
        self.retiring = False
        self.next_share = 0.0

    @property
    def title(self) -> str:
        return (f"tcpcopyd: worker {self.index + 1}/{self.n_workers} cpu={self.cpu} "
                f"[{self.cfg.interface}]")

    def setup(self) -> None:
        cfg = self.cfg
        for i, s in (*enumerate(self.sockets), *enumerate(self.answer_sockets)):
            if i != self.index and s is not None:
                s.close()
        self.cap = self.sockets[self.index]
        self.cap.setblocking(False)
        self.reader = CaptureReader(self.cap, capture.map_ring(self.cap), cfg.max_lag)
        self.epoll = select.epoll()
        self.epoll.register(self.cap.fileno(), select.EPOLLIN)
        table = SlotTable(self.seg, SLOT)
        self.control = ControlGroup(cfg.server, self.epoll, cfg.connections, cfg.secret,
                                    payload=cfg.compare)
        self._links_seen = (0, 0)   # the links' connects and errors already counted
        self.engine = engine_for(cfg, self.control, table, table.owned_range(self.index),
                                 self.index, self.n_workers)
        self.counters = self.engine.counters
        if self.inboxes is not None:
            self.strays = Strays(self.seg, self.index, self.n_workers, self.inboxes,
                                 self.strays_at, self.counters)
            self.epoll.register(self.strays.inbox.fileno(), select.EPOLLIN)
        self.mirror = MirrorWatch(self.engine.on_client_packet, self.counters) \
            if cfg.mirror else None
        self.watch = SettingsWatch("tcpcopyd", self.seg, cfg)
        self.answers = self.exchanges = None
        if cfg.compare:
            self.answers = self.answer_sockets[self.index]
            self.answers.setblocking(False)
            self.epoll.register(self.answers.fileno(), select.EPOLLIN)
            self.ring = self.rings.ring(self.index)
            # the online side is timed by the kernel's capture time of each packet
            offset = time.time() - time.monotonic()
            reader, answers = self.reader, self.answers
            self.exchanges = self.engine.observer = Exchanges(
                self.emit_exchange, self.engine.targets,
                lambda: reader.last_time() - offset,
                lambda: packet_time(answers) - offset)
        # a set of interfaces: every worker follows them (its socket's filter takes those
        # it matches); one interface: worker 1 watches it for the operator (all workers'
        # sockets resume by themselves when it comes back)
        self.follower = InterfaceFollower(cfg.interface) \
            if is_interface_set(cfg.interface) else None
        self.link_watch = self.watch_link(cfg.interface) \
            if self.index == 0 and self.follower is None else None
        self.down_since: float | None = None
        self.promiscuous: set[int] = set(self.follower.current.values()) \
            if self.follower is not None else set()
        for watch in (self.link_watch, self.follower):
            if watch is not None:
                self.epoll.register(watch.fileno(), select.EPOLLIN)
        if self.follower is not None:
            self.set_interfaces(time.monotonic())
        elif self.link_watch is not None and not self.link_watch.up:
            self.interface_went_down(time.monotonic())
        restored = self.engine.restore(time.monotonic())
        if restored:
            log.info("worker %d carries on %d session(s) from the shm table", self.index + 1,
                     restored)
        if self.strays is not None:
            self.follow_pool()    # before the first packet: a stray is handed, not opened
        log.info("worker %d capturing on %s, copying to %s", self.index + 1, cfg.interface,
                 ", ".join(str(t) for t in cfg.transfer))

    def run(self) -> None:
        on_packet = self.engine.on_client_packet
        if self.mirror is not None:
            on_packet = self.mirror.packet
        fds = (self.cap.fileno(), self.answers.fileno() if self.answers is not None else -1,
               self.link_watch.fileno() if self.link_watch else -1,
               self.follower.fileno() if self.follower else -1,
               self.strays.inbox.fileno() if self.strays is not None else -1)
        loop.serve(self, self.engine, self.control, self.epoll, self.reader, on_packet, fds,
                   self.exchanges)
        self.finish()

    def sync(self) -> None:
        """Every SYNC_INTERVAL: reloaded settings, the kernel's and the links' figures, and
        the heartbeat."""
        cnt = self.counters
        if self.watch.poll() is not None:
            apply_live(self.engine, self.cfg, self.reader)
            if self.exchanges is not None:
                self.exchanges.targets = self.engine.targets
        if self.strays is not None:
            self.follow_pool()
        reader = self.reader
        # what the kernel dropped, and what the ring could not hold whole
        kernel = (0 if self.retiring else capture.stats(self.cap)[1]) + reader.take_lost()
        stale = reader.take_dropped()
        cnt[C.INDEX["kernel_drops"]] += kernel
        cnt[C.INDEX["lag_drops"]] += stale
        self.falling_behind(kernel + stale, "captured packets dropped (kernel_drops: the "
                            "capture ring was full; lag_drops: older than max_lag), whose "
                            "requests are not copied", "workers", time.monotonic())
        retiring = self.retiring    # (no capture socket: nothing lags)
        cnt[C.INDEX["capture_lag_ms"]] = 0 if retiring else int(reader.lag * 1000)
        cnt[C.INDEX["capture_lag_peak_ms"]] = 0 if retiring else int(reader.take_peak() * 1000)
        cnt[C.INDEX["interface_down"]] = int(self.down_since is not None)
        if self.exchanges is not None:
            ex = self.exchanges
            cnt[C.INDEX["compare_answers_lost"]] += ex.answers_lost
            ex.answers_lost = 0
        connects, errors = self.control.connects, self.control.errors
        cnt[C.INDEX["control_connects"]] += connects - self._links_seen[0]
        cnt[C.INDEX["control_errors"]] += errors - self._links_seen[1]
        self._links_seen = (connects, errors)
        self.heartbeat()

    def follow_pool(self) -> None:
        """This worker's place in the pool, as the master set it: alone, sharing it with
        others (our sessions published for them), or retiring (our capture socket gone:
        the others hand us our sessions' packets until the last one ends)."""
        strays, engine = self.strays, self.engine
        try:
            place = self.seg.read_supervision(self.index).pool
        except TornRead:
            return
        if place in (POOL_SHARED, POOL_RETIRING) and not strays.shared:
            strays.share(s.cap or s.key for s in list(engine.sessions.values())
                         if s.copy == 0)
            engine.pool = strays
        elif place == POOL_ALONE and strays.shared:
            strays.alone()
            engine.pool = None
        if place == POOL_RETIRING and not self.retiring:
            self.retire(time.monotonic())
        self.counters[C.POOL_SHARED] = int(strays.shared)
        now = time.monotonic()
        if now >= self.next_share:
            self.next_share = now + SHARE_INTERVAL
            self.share_memory()
        if self.retiring and not engine.sessions and not engine.reuse:
            log.info("worker %d retired: its last session ended", self.index + 1)
            self.stop = "retired"

    def share_memory(self) -> None:
        """-m is shared by the workers in the pool now (capturing or retiring), not by the
        most it may hold: a worker alone has all of it."""
        live = 0
        for i in range(self.n_workers):
            try:
                live += self.seg.read_supervision(i).pool != POOL_PARKED
            except TornRead:
                live += 1
        engine, total = self.engine, self.cfg.memory << 20
        engine.max_memory = total // max(1, live)
        engine.max_total = min(self.cfg.total_buffer, engine.max_memory)

    def retire(self, now: float) -> None:
        """Leave the capture's fanout group (what the ring holds is read first): the
        master closed its descriptor of our socket, ours and the ring's mapping go now."""
        self.retiring = True
        self.reader.read(self.engine.on_client_packet, now, 1 << 30, 1.0)
        self.engine.flush(now)
        self.engine.frame = b""
        for sock in (self.cap, self.answers):
            if sock is not None:
                self.epoll.unregister(sock.fileno())
                # the descriptor's number stays taken (the loop knows it as the capture's)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, sock.fileno())
                os.close(null)
        if not self.reader.close():
            log.warning("worker %d: the capture ring is still in use: its socket stays in "
                        "the fanout group until the worker ends", self.index + 1)
        log.info("worker %d retiring: capture given back, %d session(s) to finish",
                 self.index + 1, len(self.engine.sessions))

    def read_strays(self, now: float) -> None:
        if self.strays is not None:
            self.strays.read(self.engine.on_client_packet, now)

    def mirror_sources(self) -> bytes:
        return pack_sources(self.mirror.sources) if self.mirror is not None else b""

    def read_answers(self, on_packet: Callable[[memoryview | bytearray, int, float], None],
                     now: float) -> None:
        """The online server's answers (the comparison test), a batch at most. An answer
        to a request not read yet (the worker was held up between its two sockets: the
        answers ran ahead) has the capture read again at once, before the answers behind
        it pile up beyond what a connection may hold early."""
        recv_into, buf, answer = self.answers.recv_into, self.reader.buf, \
            self.exchanges.answer_packet
        for _ in range(CAPTURE_BATCH):
            try:
                n = recv_into(buf)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in INTERFACE_GONE:
                    return
                raise
            if answer(buf, n):
                self.reader.read(on_packet, now, CAPTURE_BATCH, WORK_SLICE)

    def emit_exchange(self, record: dict) -> None:
        """A finished exchange to the master (never waiting: a full ring drops it)."""
        if self.ring.push([comparelog.encode(record)]):
            self.counters[C.INDEX["exchanges"]] += 1
        else:
            self.counters[C.INDEX["compare_dropped"]] += 1

    @staticmethod
    def watch_link(iface: str) -> LinkWatch | None:
        try:
            return LinkWatch(iface)
        except OSError as e:   # no netlink here (a sandbox): capture resumes by itself
            log.warning("cannot follow %s's state through netlink (%s): its going down "
                        "will not show in status", iface, e.strerror or e)
            return None

    def on_link_event(self, now: float) -> None:
        state = self.link_watch.changes()
        if state is False:
            self.interface_went_down(now)
        elif state is True and self.down_since is not None:
            gap = now - self.down_since
            self.down_since = None
            self.counters[C.INDEX["interface_down_ms"]] += int(gap * 1000)
            log.info("%s is up again after %.1fs: capture resumes (the traffic of the gap "
                     "was not copied)", self.cfg.interface, gap)

    def on_interfaces_event(self, now: float) -> None:
        """Interfaces came or went: the capture filters take those the set matches now
        (a retiring worker has none left)."""
        change = self.follower.changes()
        if change is None or self.retiring:
            return
        added, gone = change
        if self.index == 0:
            said = ([f"{', '.join(added)} appeared"] if added else []) + \
                ([f"{', '.join(gone)} went away"] if gone else [])
            log.info("-i %s: %s; capturing on %s", self.cfg.interface, "; ".join(said),
                     ", ".join(sorted(self.follower.current)) or "none")
        self.set_interfaces(now)

    def set_interfaces(self, now: float) -> None:
        """The capture sockets of this worker take the interfaces the set matches now;
        with none, the interface_down gauge says nothing is captured."""
        cfg, indexes = self.cfg, sorted(self.follower.current.values())
        ports, ipv6 = captured(cfg)
        capture.attach_filter(self.cap, capture.capture_filter(ports, ipv6=ipv6,
                                                               interfaces=indexes))
        if self.answers is not None:
            capture.attach_filter(self.answers, capture.capture_filter(
                ports, answers=True, ipv6=ipv6, interfaces=indexes))
        if cfg.mirror:    # each new one in promiscuous mode (the master's were at start)
            for index in set(indexes) - self.promiscuous:
                capture.promiscuous(self.cap, index)
            self.promiscuous = set(indexes)
        if not indexes and self.down_since is None:
            self.down_since = now
            self.counters[C.INDEX["interface_downs"]] += 1
        elif indexes and self.down_since is not None:
            self.counters[C.INDEX["interface_down_ms"]] += int((now - self.down_since) * 1000)
            self.down_since = None

    def interface_went_down(self, now: float) -> None:
        iface = self.cfg.interface
        self.down_since = now
        self.counters[C.INDEX["interface_downs"]] += 1
        if self.link_watch.removed:
            log.error("%s was removed: capture cannot resume on it; start tcpcopyd again "
                      "once it is back (tcpcopyd@%s.service, bound to the device, is stopped "
                      "and started with it)", iface, iface)
        else:
            log.warning("%s is down: nothing to capture until it comes back", iface)

    def link_states(self) -> list[LinkState]:
        return self.control.states()

    def finish(self) -> None:
        engine = self.engine
        if self.stop == "graceful":
            live = len(engine.sessions)
            engine.close_all()
            engine.flush(time.monotonic())     # the registrations' ends, the resets
            log.info("worker %d stopped; reset %d live session(s) toward the target",
                     self.index + 1, live)
        engine.sync_table()
        if self.strays is not None:
            self.strays.alone()
        self.heartbeat()
        self.control.close()
        if self.link_watch is not None:
            self.link_watch.close()
