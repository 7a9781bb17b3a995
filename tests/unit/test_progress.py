"""The progress of an offline replay: a line rewritten in place on a terminal, log lines
elsewhere."""
from __future__ import annotations

import io
import logging

from tcpcopyd.online import progress
from tcpcopyd.online.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_line_says_packets_sessions_share_rate_and_time_left():
    p = Progress("day.pcap", passes=2, stream=io.StringIO())
    text = p.line(packets=5000, sessions=120, done_passes=1, share=0.5, now=p.started + 30)
    assert text == ("day.pcap: 5000 packets, 120 sessions, 75% of the files (pass 2/2), "
                    "167 packets/s, 10s left")


def test_on_a_terminal_the_line_is_rewritten_in_place_and_ended_at_close(monkeypatch):
    out = Terminal()
    p = Progress("day.pcap", passes=1, stream=out)
    for i in range(3):
        p.next_at = 0  # due now
        p.update(packets=100 * (i + 1), sessions=i, done_passes=0, share=0.25 * (i + 1))
    p.close()
    text = out.getvalue()
    assert text.count("\r\033[K") == 3 and text.endswith("\n")
    assert "300 packets" in text and "75% of the file" in text


def test_elsewhere_progress_is_logged_every_interval(caplog):
    p = Progress("day.pcap", passes=1, stream=io.StringIO())
    assert p.interval == progress.LOG_INTERVAL
    with caplog.at_level(logging.INFO, logger="tcpcopyd.replay"):
        p.update(packets=1, sessions=1, done_passes=0, share=0.1)   # not due yet
        p.next_at = 0
        p.update(packets=2, sessions=1, done_passes=0, share=0.2)
        p.update(packets=3, sessions=1, done_passes=0, share=0.3)   # due again in 10 s
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["day.pcap: 2 packets"]
    p.close()


def test_durations_read_as_hours_minutes_seconds():
    assert [progress.duration(s) for s in (4.4, 75, 3725)] == ["4s", "1m15s", "1h02m05s"]
