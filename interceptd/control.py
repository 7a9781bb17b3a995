"""interceptd's side of the control channel: the tcpcopyd connections one worker accepted
(tcpcopyd's side is ``tcpcopyd.control``). It reads their 14-byte messages for the router,
writes out the reply headers the router framed for them, and drops a connection that
breaks the protocol or goes away. Non-blocking, on the worker's epoll."""
from __future__ import annotations

import logging
import select
import socket

from interceptd import counters as C
from interceptd.router import Peer, Router
from tcpcopyd import wire

log = logging.getLogger("interceptd.control")

RECV_SIZE = 65536


class ControlServer:
    def __init__(self, listener: socket.socket, epoll: select.epoll, router: Router,
                 counters: list[int], index: int) -> None:
        """``listener``: the control port, shared by every worker (accept never waits)."""
        self.listener = listener
        self.listener.setblocking(False)
        self.listen_fd = listener.fileno()
        self.epoll = epoll
        self.router = router
        self.counters = counters
        self.index = index
        self.peers: dict[int, Peer] = {}
        self._next_peer_id = (index << 24) + 1
        epoll.register(self.listen_fd, select.EPOLLIN)

    def __len__(self) -> int:
        return len(self.peers)

    def on_event(self, fd: int, ev: int, now: float) -> bool:
        """Handle an epoll event if ``fd`` is the control port or one of our peers."""
        if fd == self.listen_fd:
            self._accept()
            return True
        peer = self.peers.get(fd)
        if peer is None:
            return False
        self._on_peer(fd, peer, ev, now)
        return True

    def flush(self) -> None:
        """Frame what the router queued for each peer and write it out."""
        frame = self.router.frame
        for fd, peer in list(self.peers.items()):
            if peer.pending:
                frame(peer)
            if peer.out:
                self._send(fd, peer)

    def close(self) -> None:
        for fd, peer in list(self.peers.items()):
            self._drop(fd, peer, None)

    def _accept(self) -> None:
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
            self.epoll.register(sock.fileno(), select.EPOLLIN)
            self.counters[C.INDEX["peers_accepted"]] += 1
            log.info("tcpcopyd %s connected to worker %d", peer.name, self.index + 1)

    def _on_peer(self, fd: int, peer: Peer, ev: int, now: float) -> None:
        if ev & select.EPOLLIN:
            try:
                data = peer.sock.recv(RECV_SIZE)
            except BlockingIOError:
                data = None
            except OSError as e:
                self._drop(fd, peer, e.strerror)
                return
            if data == b"":
                self._drop(fd, peer, "closed the connection")
                return
            if data:
                peer.inbuf += data
                on_message = self.router.on_message
                try:
                    for kind, cip, cport, _tip, _tport in wire.parse_client_messages(
                            peer.inbuf):
                        on_message(peer, kind, cip, cport, now)
                except wire.ProtocolError as e:
                    self._drop(fd, peer, str(e))
                    return
        elif ev & (select.EPOLLERR | select.EPOLLHUP):
            self._drop(fd, peer, "connection error")
            return
        if ev & select.EPOLLOUT:
            self._send(fd, peer)

    def _send(self, fd: int, peer: Peer) -> None:
        try:
            n = peer.sock.send(peer.out)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self._drop(fd, peer, e.strerror)
            return
        del peer.out[:n]
        self.epoll.modify(fd, select.EPOLLIN | (select.EPOLLOUT if peer.out else 0))

    def _drop(self, fd: int, peer: Peer, why: str | None) -> None:
        if why:
            log.info("tcpcopyd %s %s", peer.name, why)
        self.router.drop_peer(peer)
        self.peers.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        peer.sock.close()
