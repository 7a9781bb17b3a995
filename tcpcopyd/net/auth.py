"""The shared secret on the control channel: both sides prove it, then every batch of
frames in each direction carries a tag.

The handshake (tcpcopyd offers FEATURE_AUTH, interceptd grants it; both have the secret):

1. tcpcopyd: the version message, HELLO (the features it offers), then CHALLENGE_PARTS
   messages of type CHALLENGE carrying its 32-byte nonce ``Nc``.
2. interceptd: WELCOME (the features it grants) whose body is its nonce ``Ns`` followed by
   its proof, ``HMAC-SHA256(secret, SERVER_CONTEXT + transcript)`` cut to SERVER_PROOF_SIZE.
3. tcpcopyd checks that proof (an interceptd that cannot give it is dropped: it does not
   know the secret), then sends its own, ``HMAC-SHA256(secret, CLIENT_CONTEXT +
   transcript)``, in PROOF messages. interceptd takes no registration before it checks.

``transcript`` is ``Nc + Ns + offered + granted`` (the features, 4 bytes each), so that a
feature taken out of the HELLO or the WELCOME on the way makes both proofs fail: nobody
on the path can downgrade the link.

After the proofs, each direction has its own key (``HMAC-SHA256(secret, UP_KEY or
DOWN_KEY + transcript)``; up is tcpcopyd -> interceptd) and a batch counter from 0. Every
batch of bytes a side writes ends with ``tag(batch) = HMAC-SHA256(key, counter (8 bytes,
big-endian) + batch)`` cut to TAG_SIZE bytes; the reader checks it before it uses
anything of the batch. A batch forged, changed, cut, dropped, replayed (from this or
another connection) or reordered fails its tag and the link is dropped.
"""
from __future__ import annotations

import hashlib
import hmac
import os

NONCE_SIZE = 32
# bytes of interceptd's proof kept in the WELCOME (its body has 56: nonce, then this)
SERVER_PROOF_SIZE = 24
# bytes of a batch's tag (96 bits, as HMAC-SHA1-96 in IPsec; RFC 2104 allows cutting to
# half the hash and not below 80 bits): a forged tag is accepted once in 2**96 tries and
# each wrong one ends the connection
TAG_SIZE = 12
CLIENT_CONTEXT = b"tcpcopyd control v6 auth\0"
SERVER_CONTEXT = b"tcpcopyd control v6 interceptd auth\0"
UP_KEY = b"tcpcopyd control v6 key tcpcopyd->interceptd\0"
DOWN_KEY = b"tcpcopyd control v6 key interceptd->tcpcopyd\0"


def nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def transcript(client_nonce: bytes, server_nonce: bytes, offered: int, granted: int) -> bytes:
    """What both proofs and both keys are bound to."""
    return client_nonce + server_nonce + offered.to_bytes(4, "big") + granted.to_bytes(4, "big")


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, hashlib.sha256)


def client_proof(secret: bytes, seen: bytes) -> bytes:
    """tcpcopyd's proof of the secret (32 bytes)."""
    return _mac(secret, CLIENT_CONTEXT + seen)


def server_proof(secret: bytes, seen: bytes) -> bytes:
    """interceptd's proof of the secret (SERVER_PROOF_SIZE bytes)."""
    return _mac(secret, SERVER_CONTEXT + seen)[:SERVER_PROOF_SIZE]


def same(a: bytes, b: bytes) -> bool:
    """Equal, in time that does not tell where they differ."""
    return hmac.compare_digest(a, b)


class Tagger:
    """One direction of an authenticated link: its key and how many batches it tagged
    (the writer makes tags with it, the reader checks them)."""

    __slots__ = ("keyed", "count")

    def __init__(self, secret: bytes, seen: bytes, up: bool) -> None:
        # the HMAC with its key already hashed in: a copy per batch costs half a new one
        self.keyed = hmac.new(_mac(secret, (UP_KEY if up else DOWN_KEY) + seen),
                              digestmod=hashlib.sha256)
        self.count = 0

    def tag(self, batch: bytes | bytearray) -> bytes:
        """The next batch's tag."""
        h = self.keyed.copy()
        h.update(self.count.to_bytes(8, "big"))
        h.update(batch)
        self.count += 1
        return h.digest()[:TAG_SIZE]

    def check(self, batch: bytes | bytearray, tag: bytes) -> bool:
        """Whether ``tag`` is the next batch's tag."""
        return hmac.compare_digest(self.tag(batch), tag)


def pair(secret: bytes, seen: bytes, tcpcopyd: bool) -> tuple[Tagger, Tagger]:
    """(what this side writes with, what it reads with)."""
    up, down = Tagger(secret, seen, True), Tagger(secret, seen, False)
    return (up, down) if tcpcopyd else (down, up)
