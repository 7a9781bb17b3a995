"""A tcpcopyd worker: reads its capture socket, runs the session engine, talks to
interceptd, and keeps its shm record (counters, heartbeat) fresh."""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time

from setproctitle import setproctitle

from shm.segment import Segment
from shm.table import SlotTable
from tcpcopyd import capture
from tcpcopyd import counters as C
from tcpcopyd.control import ControlGroup
from tcpcopyd.daemon import SettingsWatch
from tcpcopyd.engine import Engine
from tcpcopyd.options import Transfer
from tcpcopyd.rewrite import Rewrite, expand_pool
from tcpcopyd.sender import RawSender
from tcpcopyd.session import SLOT

log = logging.getLogger("tcpcopyd.worker")

# packets read from the capture socket before the loop looks at anything else
CAPTURE_BATCH = 512
# how often counters/heartbeat and the session table reach shm, seconds
SYNC_INTERVAL = 0.1
# how often idle sessions are looked for, seconds
EXPIRE_INTERVAL = 1.0


def targets_of(rules: list[Transfer]) -> dict:
    """The engine's map: local port, or (online address, port) -> (target address, port)."""
    return {t.port if t.online_ip is None else (socket.inet_aton(t.online_ip), t.port):
            (socket.inet_aton(t.target_ip), t.target_port) for t in rules}


def on_control_event(engine: Engine, control: ControlGroup, fd: int, ev: int,
                     now: float) -> None:
    """An epoll event of a control link: reply headers go to the engine; a link that came
    up gets the live sessions registered again."""
    link = control.link_of(fd)
    if link is None:
        return
    headers, came_up = link.on_event(ev, now)
    if came_up:
        engine.on_control_up(now)
    on_reply = engine.on_reply
    for h in headers:
        on_reply(h, now)


def rewrite_for(cfg, worker: int, workers: int) -> Rewrite | None:
    """Who the target sees (-n, -f, -c, -H); None: the clients themselves."""
    if cfg.copies == 1 and cfg.port_block is None and not cfg.client_pool \
            and not cfg.localhost_as:
        return None
    targets = {t.target_ip for t in cfg.transfer}
    return Rewrite(cfg.copies, cfg.port_block or 0,
                   expand_pool(cfg.client_pool or [], targets),
                   socket.inet_aton(cfg.localhost_as) if cfg.localhost_as else None,
                   worker, workers)


def send_due(engine: Engine, control: ControlGroup, now: float) -> None:
    """After a round of events: send what the engine queued, run its due timers, and
    write the control messages out."""
    engine.flush(now)
    nt = engine.next_timer()
    if nt is not None and nt <= now:
        engine.tick(now)
    control.flush(now)


def engine_for(cfg, control: ControlGroup, table, slots: range, worker: int,
               workers: int) -> Engine:
    """The session engine with the settings of ``cfg`` (online capture and offline replay)."""
    return Engine(targets_of(cfg.transfer), RawSender(), control, table, slots,
                  rewrite=rewrite_for(cfg, worker, workers),
                  ramp_from=time.monotonic() if cfg.ramp else None,
                  mtu=cfg.mtu, fake_mss=cfg.mss, idle_timeout=cfg.timeout,
                  keepalive_timeout=cfg.keepalive_timeout,
                  pace_timeout=0.0 if cfg.no_wait else cfg.pace_timeout,
                  max_session_buffer=cfg.session_buffer, max_total_buffer=cfg.total_buffer,
                  sample_rate=cfg.sample_rate, only_syn=cfg.only_syn,
                  initial_rtt=cfg.rtt / 1000 if cfg.rtt else None,
                  max_memory=(cfg.memory << 20) // workers if cfg.memory else None)


def apply_live(engine: Engine, cfg) -> None:
    """Settings a reload changed; they apply to new sessions (timeouts to all)."""
    engine.idle_timeout = cfg.timeout
    engine.keepalive_timeout = cfg.keepalive_timeout
    engine.pace_timeout = 0.0 if cfg.no_wait else cfg.pace_timeout
    engine.sample_rate = cfg.sample_rate
    engine.targets = targets_of([t if isinstance(t, Transfer) else Transfer(**t)
                                 for t in cfg.transfer])
    log.info("worker applied the reloaded settings: sample_rate=%d%%, timeout=%gs",
             cfg.sample_rate, cfg.timeout)


class Worker:
    def __init__(self, cfg, index: int, cpu: int, seg: Segment, cap: socket.socket) -> None:
        self.cfg = cfg
        self.index = index
        self.cpu = cpu
        self.seg = seg
        self.cap = cap
        self.stop: str | None = None

    def init_process(self) -> None:
        for sig, how in ((signal.SIGTERM, "graceful"), (signal.SIGINT, "fast"),
                         (signal.SIGQUIT, "fast")):
            signal.signal(sig, lambda _s, _f, how=how: self._stop(how))
        try:
            os.sched_setaffinity(0, {self.cpu})
        except OSError as e:
            log.warning("cannot pin worker %d to cpu %d: %s", self.index + 1, self.cpu, e)
        setproctitle(f"tcpcopyd: worker {self.index + 1}/{self.cfg.workers} cpu={self.cpu} "
                     f"[{self.cfg.interface}]")

    def _stop(self, how: str) -> None:
        if self.stop != "fast":
            self.stop = how

    def run(self) -> None:
        cfg = self.cfg
        self.init_process()
        ep = select.epoll()
        table = SlotTable(self.seg, SLOT)
        control = ControlGroup(cfg.server, ep, cfg.connections)
        engine = engine_for(cfg, control, table, table.owned_range(self.index), self.index,
                            cfg.workers)
        watch = SettingsWatch("tcpcopyd", self.seg, cfg)
        cap = self.cap
        cap.setblocking(False)
        capfd = cap.fileno()
        ep.register(capfd, select.EPOLLIN)
        buf = bytearray(65536 + 64)
        recv_into = cap.recv_into
        on_packet = engine.on_client_packet
        started = time.time()
        cnt = engine.counters
        restored = engine.restore(time.monotonic())
        if restored:
            log.info("worker %d carries on %d session(s) from the shm table", self.index + 1,
                     restored)
        kdrop = C.INDEX["kernel_drops"]
        next_sync = next_expire = 0.0
        log.info("worker %d capturing on %s, copying to %s", self.index + 1, cfg.interface,
                 ", ".join(f"{t.port}->{t.target_ip}:{t.target_port}" for t in cfg.transfer))
        while not self.stop:
            now = time.monotonic()
            control.maybe_connect(now)
            nt = engine.next_timer()
            timeout = SYNC_INTERVAL if nt is None else max(0.0, min(SYNC_INTERVAL, nt - now))
            try:
                events = ep.poll(timeout)
            except InterruptedError:
                continue
            now = time.monotonic()
            for fd, ev in events:
                if fd == capfd:
                    for _ in range(CAPTURE_BATCH):
                        try:
                            n = recv_into(buf)
                        except BlockingIOError:
                            break
                        on_packet(buf, n, now)
                else:
                    on_control_event(engine, control, fd, ev, now)
            send_due(engine, control, now)
            # the session table is kept current, so a new worker can carry sessions on
            engine.sync_table()
            if now >= next_sync:
                next_sync = now + SYNC_INTERVAL
                if now >= next_expire:
                    next_expire = now + EXPIRE_INTERVAL
                    engine.expire_idle(now)
                if watch.poll() is not None:
                    apply_live(engine, cfg)
                cnt[kdrop] += capture.stats(cap)[1]
                cnt[C.INDEX["control_connects"]] = control.connects
                cnt[C.INDEX["control_errors"]] = control.errors
                self.seg.write_worker(self.index, os.getpid(), self.cpu, started, cnt)
        # stopping
        if self.stop == "graceful":
            live = len(engine.sessions)
            engine.close_all()
            control.flush(time.monotonic())
            log.info("worker %d stopped; reset %d live session(s) toward the target",
                     self.index + 1, live)
        engine.sync_table()
        self.seg.write_worker(self.index, os.getpid(), self.cpu, started, cnt)
        control.close()
