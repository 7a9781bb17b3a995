"""The comparison test's records, from the workers to ``compare_log``: each worker puts the
exchanges it saw whole (``tcpcopyd.online.compare``) in its ring, never waiting (a full
ring drops the record, counted ``compare_dropped``); the master drains the rings, wipes
what it took, judges each pair (``tcpcopyd.online.answers``, with the noise rules of the
settings) and appends it as one JSON line.

The records hold production requests and answers, so the rings are not in the shm
segment (which the status group reads): they are in memory the master maps before it
forks the workers and shares with them only (anonymous, never a file, left out of core
dumps). The log and its HTML report are 0600."""
from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import time

from shm.ring import Ring, ring_size
from tcpcopyd.net.packet import endpoint
from tcpcopyd.online import answers
from tcpcopyd.online.compare import PREFIX, REQUEST_PREFIX

log = logging.getLogger("tcpcopyd.compare")

RECORD = 2048          # bytes of one ring record: u16 length, then JSON
RING_CAPACITY = 512    # records per worker
LENGTH = struct.Struct("<H")


class Rings:
    """Every worker's ring of records, in memory that only the master and the workers it
    forks share."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.mm = mmap.mmap(-1, workers * ring_size(RING_CAPACITY, RECORD))
        if hasattr(mmap, "MADV_DONTDUMP"):
            self.mm.madvise(mmap.MADV_DONTDUMP)

    def ring(self, index: int) -> Ring:
        """Worker ``index``'s ring."""
        return Ring(self.mm, index * ring_size(RING_CAPACITY, RECORD), RING_CAPACITY, RECORD)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


def encode(rec: dict) -> bytes:
    """A worker's record as a ring record (prefixes shortened until it fits)."""
    cip, cport, tip, tport = rec["key"]
    limit = PREFIX
    while True:
        body = {"ts": rec["ts"], "client": endpoint(cip, cport),
                "target_address": endpoint(tip, tport), "n": rec["n"],
                "request": _text(rec["request"][:min(limit, REQUEST_PREFIX)])}
        for side in ("online", "target"):
            v = rec[side]
            body[side] = None if v is None else {**v, "first": _text(v["first"][:limit])}
        data = json.dumps(body, separators=(",", ":")).encode()
        if len(data) <= RECORD - LENGTH.size or limit == 0:
            data = data[:RECORD - LENGTH.size]
            return (LENGTH.pack(len(data)) + data).ljust(RECORD, b"\0")
        limit //= 2


def decode(record: bytes) -> dict | None:
    (n,) = LENGTH.unpack_from(record)
    try:
        return json.loads(bytes(record[LENGTH.size:LENGTH.size + n]))
    except ValueError:
        return None


def open_private(path: str, mode: str):
    """Open ``path`` for writing, readable by its owner only (0600) whatever the umask, and
    made so if it was readable by others before; never through a symbolic link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | \
        (os.O_APPEND if mode == "a" else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
        return os.fdopen(fd, mode, buffering=1 << 16)
    except BaseException:
        os.close(fd)
        raise


def judged(rec: dict, rules: answers.Rules) -> dict:
    """The record as written: with the request's path, each side's status, and how the two
    sides compare (None where a side is missing)."""
    request = answers.as_bytes(rec["request"])
    rec["path"] = answers.path_of(request)
    for side in ("online", "target"):
        if rec.get(side):
            rec[side]["status"] = answers.status_of(answers.as_bytes(rec[side]["first"]))
    o, t = rec.get("online"), rec.get("target")
    if o and t:
        a, b = answers.as_bytes(o["first"]), answers.as_bytes(t["first"])
        n = min(len(a), len(b))
        rec.update(answers.judge(a[:n], b[:n], o["size"], t["size"], rules))
        rec["same_status"] = o["status"] == t["status"] if a and b else None
    else:
        rec.update(same_status=None, same_size=None, same_content=None)
    return rec


class CompareLog:
    """The master's side: drains every worker's ring into the file (reopened on SIGUSR1,
    for logrotate). A file that cannot be written (a full disk) never stops the master:
    the exchanges are dropped, counted, and said once a minute."""

    def __init__(self, path: str, rings: Rings, rules: tuple[str, ...]) -> None:
        self.path = path
        self.rings = [rings.ring(i) for i in range(rings.workers)]
        self.rules = answers.Rules.parse(list(rules))
        self.written = 0
        self.lost = 0
        self._said = 0.0
        self.file = self._open()

    def _open(self):
        """The log, 0600 whatever the umask (it holds production requests and answers)."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o750, exist_ok=True)
        return open_private(self.path, "a")

    def drain(self) -> int:
        lines = []
        for r in self.rings:
            for record in r.pop_all(clear=True):   # read, then wiped from the segment
                try:
                    rec = decode(record)
                    lines.append(json.dumps(judged(rec, self.rules), separators=(",", ":")))
                except (KeyError, TypeError, ValueError, AttributeError, IndexError,
                        struct.error):
                    self.lost += 1    # not a record a worker of this release makes
        if not lines:
            return 0
        try:
            if self.file is None:
                self.file = self._open()
            self.file.write("\n".join(lines) + "\n")
            self.file.flush()
        except OSError as e:
            self.lost += len(lines)
            now = time.monotonic()
            if now - self._said >= 60:
                self._said = now
                log.error("compare_log %s: cannot write (%s): %d exchange(s) lost so far",
                          self.path, e.strerror or e, self.lost)
            return 0
        self.written += len(lines)
        return len(lines)

    def reopen(self) -> None:
        try:
            if self.file is not None:
                self.file.close()
        except OSError:
            pass
        try:
            self.file = self._open()
        except OSError as e:
            self.file = None      # tried again at the next drain
            log.error("compare_log %s: cannot reopen it: %s", self.path, e.strerror or e)

    def close(self) -> None:
        self.drain()
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
