"""How interceptd reads the operator's rules (--no-iptables): which service ports no rule
queues to its queues. iptables' output stands in for iptables here; the lab test
(test_daemon_options) reads real rules."""
from __future__ import annotations

import subprocess

import pytest

from interceptd import rules

HEADER = "-P OUTPUT ACCEPT\n"


def tables(monkeypatch, filter_rules: str, mangle_rules: str = "") -> None:
    def run(args, v6=False):
        text = {"filter": filter_rules, "mangle": mangle_rules}.get(args[1], "")
        return subprocess.CompletedProcess(args, 0, HEADER + text, "")
    monkeypatch.setattr(rules, "_run", run)


@pytest.mark.parametrize("text, missing", [
    ("", [80, 11211]),
    ("-A OUTPUT -p tcp -m tcp --sport 80 -j NFQUEUE --queue-num 3\n", [11211]),
    ("-A OUTPUT -p tcp -m tcp --sport 1:1024 -j NFQUEUE --queue-num 3\n", [11211]),
    ("-A OUTPUT -p tcp -m tcp --sport 1024: -j NFQUEUE --queue-num 3\n", [80]),
    ("-A OUTPUT -p tcp -j NFQUEUE --queue-balance 3:4\n", []),
    ("-A OUTPUT -j NFQUEUE --queue-num 3\n", []),                   # every protocol
    ("-A OUTPUT -p udp --sport 80 -j NFQUEUE --queue-num 3\n", [80, 11211]),
    ("-A OUTPUT ! -p tcp -j NFQUEUE --queue-num 3\n", [80, 11211]),
    ("-A OUTPUT -p tcp ! --sport 80 -j NFQUEUE --queue-num 3\n", [80, 11211]),
    ("-A OUTPUT -p tcp --sport 80 -j NFQUEUE --queue-num 3 --queue-bypass\n", [80, 11211]),
    ("-A OUTPUT -p tcp --sport 80 -j NFQUEUE --queue-num 7\n", [80, 11211]),  # not ours
    ("-A OUTPUT -p tcp --sport 80 -j NFQUEUE --queue-balance 3:9\n", [80, 11211]),
    ("-A INPUT -p tcp --sport 80 -j NFQUEUE --queue-num 3\n", [80, 11211]),
    # a chain of the operator's, reached from OUTPUT (a chain not reached does not count)
    ("-N COPY\n-N OTHER\n-A OUTPUT -o eth0 -j COPY\n"
     "-A COPY -p tcp -m multiport --sports 11211 -j NFQUEUE --queue-num 4\n"
     "-A OTHER -p tcp --sport 80 -j NFQUEUE --queue-num 3\n", [80]),
    ('-A OUTPUT -p tcp -m comment --comment "copy it" --sport 80 -j NFQUEUE '
     "--queue-num 3\n", [11211]),
])
def test_the_ports_no_rule_queues(monkeypatch, text, missing):
    tables(monkeypatch, text)
    assert rules.unqueued_ports([80, 11211], 3, 2) == missing


def test_a_rule_in_another_table_counts(monkeypatch):
    tables(monkeypatch, "", "-A OUTPUT -p tcp --sport 80 -j NFQUEUE --queue-num 3\n")
    assert rules.unqueued_ports([80], 3, 1) == []
