"""An interceptd worker: reads its NFQUEUE (dropping every packet: the target's replies must
never reach anyone), serves the tcpcopyd control connections it accepts, and routes reply
headers — to its own connections, or through a shm ring to the worker holding the session's
connection."""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable

from setproctitle import setproctitle

from interceptd import counters as C
from interceptd.router import Peer, Router
from interceptd.shared import Shared
from shm.segment import Segment
from tcpcopyd import wire
from tcpcopyd.capture import stats as capture_stats
from tcpcopyd.daemon import SettingsWatch

log = logging.getLogger("interceptd.worker")

SYNC_INTERVAL = 0.1
# packets read from a capture socket (assistant mode) before the loop looks at the rest
CAPTURE_BATCH = 512

# The NFQUEUE bindings are made by the master (so a dying worker does not unbind its queue:
# packets wait in the kernel for the next one). Their callback is this trampoline, pointed
# at the worker's handler after the fork.
_handler: Callable | None = None


def dispatch(pkt) -> None:
    if _handler is None:
        pkt.drop()
    else:
        _handler(pkt)


class Worker:
    def __init__(self, cfg, index: int, cpu: int, seg: Segment, listener: socket.socket,
                 source, wakeups: list[int]) -> None:
        """``source``: this worker's NFQUEUE binding, or (assistant mode) its AF_PACKET
        capture socket."""
        self.cfg = cfg
        self.index = index
        self.cpu = cpu
        self.seg = seg
        self.listener = listener
        self.capture = source if isinstance(source, socket.socket) else None
        self.nfq = None if self.capture else source
        self.queue_num = cfg.queue_num + index
        self.source_name = (f"capture on {cfg.interface}" if self.capture
                            else f"NFQUEUE {self.queue_num}")
        self.wakeups = wakeups           # one eventfd per worker: "your ring has records"
        self.stop = False
        self.counters = [0] * len(C.NAMES)
        self.shared = Shared(seg) if seg.n_workers > 1 else None
        self.router = Router(self.counters, index,
                             self.shared.table if self.shared else None)
        self.peers: dict[int, Peer] = {}
        self._next_peer_id = (index << 24) + 1

    def init_process(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_stop)
        try:
            os.sched_setaffinity(0, {self.cpu})
        except OSError as e:
            log.warning("cannot pin worker %d to cpu %d: %s", self.index + 1, self.cpu, e)
        where = f"capture={self.cfg.interface}" if self.capture else f"queue={self.queue_num}"
        setproctitle(f"interceptd: worker {self.index + 1}/{self.seg.n_workers} {where}")

    def _on_stop(self, _sig: int, _frame: object) -> None:
        self.stop = True

    def run(self) -> None:
        global _handler
        self.init_process()
        router = self.router
        cnt = self.counters
        queued, malformed = C.INDEX["queued"], C.INDEX["malformed"]
        clock = time.monotonic
        reply_header = wire.reply_header

        def on_packet(pkt) -> None:
            payload = pkt.get_payload()
            pkt.drop()
            cnt[queued] += 1
            try:
                if payload[9] != 6:
                    raise wire.ProtocolError("not TCP")
                router.route(reply_header(payload), clock())
            except (wire.ProtocolError, IndexError):
                cnt[malformed] += 1

        _handler = on_packet
        nfq = self.nfq
        cap = self.capture
        buf = bytearray(65536)
        if cap is not None:
            cap.setblocking(False)
            source_fd = cap.fileno()
        else:
            source_fd = nfq.get_fd()
        ep = select.epoll()
        ep.register(source_fd, select.EPOLLIN)
        lfd = self.listener.fileno()
        self.listener.setblocking(False)  # shared by all workers: accept never waits
        ep.register(lfd, select.EPOLLIN)
        my_wakeup = self.wakeups[self.index]
        ep.register(my_wakeup, select.EPOLLIN)
        inbound = [self.shared.ring(src, self.index) for src in range(self.seg.n_workers)
                   if src != self.index] if self.shared else []
        outbound = {dst: self.shared.ring(self.index, dst) for dst in range(self.seg.n_workers)
                    if dst != self.index} if self.shared else {}
        started = time.time()
        next_sync = 0.0
        watch = SettingsWatch("interceptd", self.seg, self.cfg)
        self.seg.write_worker(self.index, os.getpid(), self.cpu, started, cnt)
        log.info("worker %d reading %s, control port %s:%d", self.index + 1,
                 self.source_name, *self.listener.getsockname()[:2])
        self._drain(inbound, clock())   # what a previous worker of this index left
        while not self.stop:
            try:
                events = ep.poll(SYNC_INTERVAL)
            except InterruptedError:
                continue
            now = clock()
            for fd, ev in events:
                if fd == source_fd:
                    if cap is not None:
                        self._read_capture(cap, buf, now)
                        continue
                    try:
                        nfq.run(block=False)
                    except OSError as e:
                        log.warning("NFQUEUE read: %s", e)
                elif fd == my_wakeup:
                    try:
                        os.eventfd_read(my_wakeup)
                    except BlockingIOError:
                        pass
                    self._drain(inbound, now)
                elif fd == lfd:
                    self._accept(ep)
                else:
                    peer = self.peers.get(fd)
                    if peer is not None:
                        self._on_peer(ep, fd, peer, ev, now)
            if router.outbox:
                self._hand_off(outbound)
            for fd, peer in list(self.peers.items()):
                if peer.pending:
                    router.frame(peer)
                if peer.out:
                    self._send(ep, fd, peer)
            if now >= next_sync:
                next_sync = now + SYNC_INTERVAL
                router.retry_delayed(now)
                watch.poll()   # only logging is live here; applied by the watch itself
                cnt[C.INDEX["peers"]] = len(self.peers)
                cnt[C.INDEX["routes"]] = len(router.routes)
                if cap is not None:
                    cnt[C.INDEX["queue_drops"]] += capture_stats(cap)[1]
                else:
                    cnt[C.INDEX["queue_drops"]] = queue_drops(self.queue_num)
                self.seg.write_worker(self.index, os.getpid(), self.cpu, started, cnt)
        for fd, peer in list(self.peers.items()):
            self._drop(ep, fd, peer, None)
        self.seg.write_worker(self.index, os.getpid(), self.cpu, started, cnt)
        log.info("worker %d stopped", self.index + 1)

    def _read_capture(self, cap: socket.socket, buf: bytearray, now: float) -> None:
        """Assistant mode: replies the target routed here (the kernel drops them after us,
        since this host does not forward)."""
        cnt = self.counters
        queued, malformed = C.INDEX["queued"], C.INDEX["malformed"]
        route, reply_header = self.router.route, wire.reply_header
        for _ in range(CAPTURE_BATCH):
            try:
                n = cap.recv_into(buf)
            except BlockingIOError:
                return
            cnt[queued] += 1
            try:
                route(reply_header(memoryview(buf)[:n]), now)
            except (wire.ProtocolError, IndexError):
                cnt[malformed] += 1

    def _drain(self, inbound, now: float) -> None:
        deliver = self.router.deliver
        for ring in inbound:
            records = ring.pop_all()
            self.counters[C.INDEX["handed_in"]] += len(records)
            for h in records:
                deliver(h, now)

    def _hand_off(self, outbound) -> None:
        for dst, headers in self.router.outbox.items():
            n = outbound[dst].push(headers)
            self.counters[C.INDEX["handed_off"]] += n
            if n < len(headers):
                self.counters[C.INDEX["handoff_full"]] += len(headers) - n
            if n:
                try:
                    os.eventfd_write(self.wakeups[dst], 1)
                except BlockingIOError:
                    pass
        self.router.outbox.clear()

    def _accept(self, ep: select.epoll) -> None:
        while True:
            try:
                sock, addr = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                log.warning("accept: %s", e)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = Peer(sock, f"{addr[0]}:{addr[1]}", self._next_peer_id)
            self._next_peer_id += 1
            self.peers[sock.fileno()] = peer
            ep.register(sock.fileno(), select.EPOLLIN)
            self.counters[C.INDEX["peers_accepted"]] += 1
            log.info("tcpcopyd %s connected to worker %d", peer.name, self.index + 1)

    def _on_peer(self, ep: select.epoll, fd: int, peer: Peer, ev: int, now: float) -> None:
        if ev & select.EPOLLIN:
            try:
                data = peer.sock.recv(65536)
            except BlockingIOError:
                data = None
            except OSError as e:
                self._drop(ep, fd, peer, e.strerror)
                return
            if data == b"":
                self._drop(ep, fd, peer, "closed the connection")
                return
            if data:
                peer.inbuf += data
                try:
                    for kind, cip, cport, _tip, _tport in wire.parse_client_messages(
                            peer.inbuf):
                        self.router.on_message(peer, kind, cip, cport, now)
                except wire.ProtocolError as e:
                    self._drop(ep, fd, peer, str(e))
                    return
        elif ev & (select.EPOLLERR | select.EPOLLHUP):
            self._drop(ep, fd, peer, "connection error")
            return
        if ev & select.EPOLLOUT:
            self._send(ep, fd, peer)

    def _send(self, ep: select.epoll, fd: int, peer: Peer) -> None:
        try:
            n = peer.sock.send(peer.out)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self._drop(ep, fd, peer, e.strerror)
            return
        del peer.out[:n]
        ep.modify(fd, select.EPOLLIN | (select.EPOLLOUT if peer.out else 0))

    def _drop(self, ep: select.epoll, fd: int, peer: Peer, why: str | None) -> None:
        if why:
            log.info("tcpcopyd %s %s", peer.name, why)
        self.router.drop_peer(peer)
        self.peers.pop(fd, None)
        try:
            ep.unregister(fd)
        except (OSError, ValueError):
            pass
        peer.sock.close()


def queue_drops(queue_num: int) -> int:
    """Packets the kernel dropped for this queue (queue full + user-space too slow)."""
    try:
        with open("/proc/net/netfilter/nfnetlink_queue") as f:
            for line in f:
                fields = line.split()
                if fields and int(fields[0]) == queue_num and len(fields) >= 7:
                    return int(fields[5]) + int(fields[6])
    except (OSError, ValueError):
        pass
    return 0
