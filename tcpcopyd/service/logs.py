"""Logging of both daemons: stderr (journald under systemd, with syslog priorities) or a
file reopened on SIGUSR1; levels; repeated warnings and errors rate-limited."""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

# at most BURST records of one message (same logger, level and format string) per WINDOW
# seconds; the first one after the window says how many were held back
BURST = 5
WINDOW = 10.0
# logging level -> syslog priority, for journald's "<N>" line prefix
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
            logging.CRITICAL: 2}


class RateLimit(logging.Filter):
    """Lets warnings and errors of the same kind through at most ``burst`` times per
    ``window`` seconds; info and debug records always pass."""

    def __init__(self, burst: int = BURST, window: float = WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self.clock = clock
        self.seen: dict[tuple, list] = {}   # key -> [window start, passed, held back]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        state = self.seen.get(key)
        if state is None or now - state[0] >= self.window:
            held = state[2] if state else 0
            self.seen[key] = [now, 1, 0]
            if held:
                record.msg = f"{record.msg} [{held} more like this held back in the last " \
                             f"{self.window:g}s]"
            if len(self.seen) > 1000:
                self._forget(now)
            return True
        if state[1] < self.burst:
            state[1] += 1
            return True
        state[2] += 1
        return False

    def _forget(self, now: float) -> None:
        for key, state in list(self.seen.items()):
            if now - state[0] >= self.window and not state[2]:
                del self.seen[key]


class JournalFormatter(logging.Formatter):
    """``<priority>LEVEL message``: journald stores the priority and adds time and pid."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def _under_journald() -> bool:
    """systemd sets JOURNAL_STREAM to the device:inode of the stream it connected."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def setup(prog: str, path: str | None, level: str) -> None:
    """Log to ``path`` (appending) or to stderr, at ``level``; replaces earlier set-up.
    Raises OSError if the file cannot be opened."""
    handler: logging.Handler
    if path:
        # created readable by the group at most (logs may hold client addresses)
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640))
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {prog}[%(process)d] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    elif _under_journald():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JournalFormatter("%(levelname)s %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {prog}[%(process)d] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def reopen() -> None:
    """Reopen log files (after logrotate moved them); safe in a signal handler of the
    thread that logs, whose handler lock is re-entrant."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.acquire()
            try:
                if h.stream is not None:
                    h.stream.close()
                h.stream = h._open()
            except OSError:
                pass  # keep logging to nowhere rather than crash; the next reopen may work
            finally:
                h.release()
