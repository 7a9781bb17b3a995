"""How far an offline replay has come: on a terminal, one line rewritten in place twice a
second; otherwise (a log file, the journal) a log line every LOG_INTERVAL seconds. Packets
replayed, sessions, share of the file (over every pass of -T), rate and time left."""
from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger("tcpcopyd.replay")

TERMINAL_INTERVAL = 0.5
LOG_INTERVAL = 10.0


def duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """The progress line (or log line) of one offline replay."""

    def __init__(self, name: str, passes: int, stream: TextIO | None = None) -> None:
        self.name, self.passes = name, passes
        self.stream = sys.stderr if stream is None else stream
        self.terminal = self.stream.isatty()
        self.interval = TERMINAL_INTERVAL if self.terminal else LOG_INTERVAL
        self.started = time.monotonic()
        self.next_at = self.started + self.interval
        self.shown = False

    def line(self, packets: int, sessions: int, done_passes: int, share: float,
             now: float) -> str:
        overall = min(1.0, (done_passes + share) / self.passes)
        elapsed = max(now - self.started, 1e-6)
        text = (f"{self.name}: {packets} packets, {sessions} sessions, {overall:.0%} "
                f"of the file{'s' if self.passes > 1 else ''}"
                + (f" (pass {min(done_passes + 1, self.passes)}/{self.passes})"
                   if self.passes > 1 else "")
                + f", {packets / elapsed:.0f} packets/s")
        if 0 < overall < 1:
            text += f", {duration(elapsed * (1 - overall) / overall)} left"
        return text

    def update(self, packets: int, sessions: int, done_passes: int, share: float) -> None:
        """Called as often as convenient; shows a line when one is due."""
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = now + self.interval
        text = self.line(packets, sessions, done_passes, share, now)
        if self.terminal:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
            self.shown = True
        else:
            log.info("%s", text)

    def close(self) -> None:
        """Ends the terminal's line, so that the final report starts on a line of its own."""
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False
