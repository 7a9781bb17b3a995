"""Offline replay: `tcpcopyd -i FILE.pcap` sends the sessions of a capture file to the
target through interceptd, as the live copy would: with their original timing, or `-a N`
times faster, idle gaps longer than `-I MS` cut to that, `-T N` times over. One process
(a replay is a one-shot job, not a service); it ends when every replayed session has
ended, printing what it did."""
from __future__ import annotations

import collections
import logging
import select
import signal
import time

from tcpcopyd.net import packet as P
from tcpcopyd.net import pcapfile
from tcpcopyd.online import counters as C
from tcpcopyd.online import loop
from tcpcopyd.online.control import ControlGroup
from tcpcopyd.online.mirror import MirrorWatch
from tcpcopyd.online.options import show_servers
from tcpcopyd.online.progress import Progress
from tcpcopyd.online.worker import engine_for
from tcpcopyd.service.startup import EARLY_SIGNALS

log = logging.getLogger("tcpcopyd.replay")

# how long the replay waits for interceptd before giving up
CONNECT_TIMEOUT = 10.0
# after the last packet: sessions with no traffic for this long are reset toward the target
DRAIN_QUIET = 3.0
# and whatever is left after this long
DRAIN_MAX = 120.0


class Replay:
    """One offline replay of a capture file: the engine fed with its packets on their original
    clock, the control links served meanwhile."""

    def __init__(self, cfg, path: str) -> None:
        self.cfg = cfg
        self.path = path
        self.ports = {t.port for t in cfg.transfer}
        self.ep = select.epoll()
        self.control = ControlGroup(cfg.server, self.ep, cfg.connections, cfg.secret)
        self.engine = engine_for(cfg, self.control, None, range(cfg.session_slots), 0, 1)
        # a capture taken from a mirror (--mirror): its duplicates skipped, as live
        self.feed = MirrorWatch(self.engine.on_client_packet, self.engine.counters).packet \
            if cfg.mirror else self.engine.on_client_packet
        self.skipped: collections.Counter = collections.Counter()
        self.replayed = 0
        self.passes_done = 0
        self.position = pcapfile.Position()
        self.progress = Progress(path, cfg.repeat)
        self.stop = False
        self._next_expire = 0.0

    # ------------------------------------------------------------------ the loop
    def pump(self, until: float) -> None:
        """Serve the control links and the engine's timers until ``until`` (monotonic)."""
        engine, control = self.engine, self.control
        while not self.stop:
            events, now = loop.wait(engine, control, self.ep,
                                    max(0.0, min(until - time.monotonic(), 0.1)))
            if not events and now < until:
                self.show_progress()    # a long gap of the capture: the line stays fresh
            for fd, ev in events:
                loop.on_control_event(engine, control, fd, ev, now)
            loop.send_due(engine, now)
            if now >= self._next_expire:
                self._next_expire = now + 1.0
                engine.expire_idle(now)
            if now >= until:
                return

    def wanted(self, pkt: bytes) -> bool:
        """A TCP packet (IPv4, or IPv6 behind its extension headers) to a copied port."""
        if pkt[0] >> 4 == 6:
            at = P.tcp_offset6(pkt, len(pkt))
        elif len(pkt) >= 20 and P.is_tcp_ipv4(pkt):
            at = P.ip_header_length(pkt)
        else:
            return False
        return at >= 0 and len(pkt) >= at + 4 and P.destination_port(pkt, at) in self.ports

    def play_once(self, accelerate: float, idle_cut: float | None) -> None:
        base_real = base_ts = prev = None
        shift = 0.0
        for ts, pkt in pcapfile.packets(self.path, self.skipped, position=self.position):
            if self.stop:
                return
            if not self.wanted(pkt):
                self.skipped["other_traffic"] += 1
                continue
            if base_real is None:
                base_real, base_ts = time.monotonic(), ts
            if prev is not None and idle_cut is not None and ts - prev > idle_cut:
                shift += ts - prev - idle_cut
            prev = ts
            self.pump(base_real + (ts - base_ts - shift) / accelerate)
            self.feed(pkt, len(pkt), time.monotonic())
            self.replayed += 1
            if self.replayed % 64 == 0:
                self.show_progress()
        self.drain()

    def show_progress(self) -> None:
        cnt = self.engine.counters
        self.progress.update(self.replayed, cnt[C.INDEX["sessions_opened"]]
                             + cnt[C.INDEX["sessions_fake"]], self.passes_done,
                             self.position.share)

    def drain(self) -> None:
        """Let the replayed sessions finish; reset those that went quiet."""
        engine = self.engine
        end = time.monotonic() + DRAIN_MAX
        while engine.sessions and not self.stop and time.monotonic() < end:
            self.pump(time.monotonic() + 0.2)
            engine.expire_idle(time.monotonic(), DRAIN_QUIET)
        if engine.sessions:
            engine.close_all()
        self.pump(time.monotonic() + 0.2)

    def run(self, accelerate: float, idle_cut: float | None, repeat: int) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda _s, _f: setattr(self, "stop", True))
        self.stop = bool(EARLY_SIGNALS)
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while not self.control.up and time.monotonic() < deadline and not self.stop:
            self.pump(time.monotonic() + 0.05)
        if not self.control.up:
            log.error("no interceptd reachable at %s: nothing replayed",
                      ", ".join(show_servers(self.cfg.server)))
            return 1
        started = time.monotonic()
        for i in range(repeat):
            if self.stop:
                break
            log.info("replaying %s (%d/%d) at %gx%s", self.path, i + 1, repeat, accelerate,
                     f", idle gaps cut to {idle_cut * 1000:g} ms" if idle_cut is not None else "")
            self.play_once(accelerate, idle_cut)
            self.passes_done += 1
        self.progress.close()
        self.control.close()
        cnt = dict(zip(C.NAMES, self.engine.counters, strict=True))
        if cnt["mirror_duplicates"]:
            self.skipped["mirror_duplicates"] = cnt["mirror_duplicates"]
        log.info("replay done in %.1fs: %d packets replayed, %d sessions (%d seen from their "
                 "SYN), %d packets sent to the target; skipped: %s", time.monotonic() - started,
                 self.replayed, cnt["sessions_opened"] + cnt["sessions_fake"],
                 cnt["sessions_opened"], cnt["sent"],
                 ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "nothing")
        if self.skipped["truncated"]:
            log.warning("%d packets were cut by the capture's snap length (%s): capture with "
                        "tcpdump -s 0", self.skipped["truncated"], self.skipped["snaplen"] or "?")
        return 130 if self.stop else 0
