"""What tcpcopyctl status judges from a daemon's figures, and the Prometheus exposition of
them (names, types, escaping; promtool checks real ones in tests/lab/test_operator_view.py)."""
from __future__ import annotations

import re

from shm.segment import LinkState, pack_links, unpack_links
from tcpcopyd.health import metrics, status
from tcpcopyd.online import counters as C

NOW = 1_000_000.0


def worker(index=1, links=(), alive=True, heartbeat_age=0.1, **counters):
    return {"index": index, "pid": 100 + index if alive else 0, "alive": alive, "cpu": 0,
            "restarts": 0, "recent_deaths": 0, "last_exit": None, "respawn_in_s": None,
            "heartbeat_age_s": heartbeat_age, "counters": dict.fromkeys(C.NAMES, 0) | counters,
            "links": list(links)}


def daemon(workers, rates=None, settings=None, master_alive=True):
    d = {"name": "tcpcopyd.eth0", "program": "tcpcopyd", "label": "eth0",
         "master": {"pid": 99, "alive": master_alive}, "settings": settings or {"max_lag": 1.0},
         "workers": workers, "totals": {}, "rates_per_s": rates or {}}
    for w in workers:
        for k, v in w["counters"].items():
            d["totals"][k] = d["totals"].get(k, 0) + v
    d["links"] = status.link_table(workers, NOW)
    d["lag_ms"] = max(w["counters"]["capture_lag_ms"] for w in workers)
    d["drops"] = {k: d["totals"][k] for k in sorted(C.DROPS)}
    d["drops_rising"] = {k: r for k, r in d["rates_per_s"].items() if k in C.DROPS and r > 0}
    d["state"], d["problems"] = status.judge(d)
    return d


def link(host="198.18.2.2", up=1, links=1, since=NOW - 60, connects=1, errors=0, reason=""):
    return LinkState(host, 36524, links, up, since, connects, errors, reason)


def test_links_travel_through_the_worker_record():
    states = [link(), link("198.18.2.3", up=0, errors=4, reason="Connection refused")]
    assert unpack_links(pack_links(states)) == tuple(states)


def test_every_link_up_is_healthy():
    d = daemon([worker(1, [link()]), worker(2, [link()])])
    assert (d["state"], d["problems"]) == ("healthy", [])
    [peer] = d["links"]
    assert (peer["state"], peer["up"], peer["links"], peer["for_s"]) == ("up", 2, 2, 60)


def test_no_interceptd_reachable_is_down_and_says_why():
    d = daemon([worker(1, [link(up=0, connects=0, errors=3, reason="Connection refused")])])
    assert d["state"] == "down"
    assert d["problems"] == ["no interceptd reachable: 198.18.2.2:36524 down "
                             "(Connection refused)"]
    assert status.exit_code([d]) == 3


def test_one_interceptd_of_two_down_is_degraded():
    d = daemon([worker(1, [link(), link("198.18.2.3", up=0, errors=1, reason="timed out")])])
    assert d["state"] == "degraded"
    assert d["problems"] == ["interceptd 198.18.2.3:36524: 0/1 links up (timed out)"]
    assert status.exit_code([d]) == 1


def test_reconnects_count_every_connection_after_the_first_of_each_link():
    d = daemon([worker(1, [link(connects=3)]), worker(2, [link(connects=1)])])
    assert d["links"][0]["reconnects"] == 2


def test_drops_rising_and_a_lagging_capture_are_degraded():
    d = daemon([worker(1, [link()], capture_lag_ms=700, kernel_drops=5)],
               rates={"kernel_drops": 2.0, "sent": 100.0})
    assert d["state"] == "degraded"
    assert d["problems"] == [
        "capture lag 700 ms (max_lag 1000 ms: the worker is falling behind; more workers "
        "share the load)",
        "kernel_drops rising (2.0/s)"]
    # drops that happened once and stopped are shown, not held against it
    assert daemon([worker(1, [link()], kernel_drops=5)])["state"] == "healthy"


def test_a_stale_worker_degrades_and_no_worker_or_master_is_down():
    assert daemon([worker(1, [link()]), worker(2, [link()], heartbeat_age=9)])["state"] \
        == "degraded"
    assert daemon([worker(1, alive=False, heartbeat_age=None)])["state"] == "down"
    assert daemon([worker(1, [link()])], master_alive=False)["state"] == "down"


def test_the_exposition_has_help_and_type_once_per_family_and_sane_names():
    d1 = daemon([worker(1, [link()], sent=10, bytes_sent=1000, capture_lag_ms=250),
                 worker(2, [link()], sent=5)])
    d2 = daemon([worker(1, [link()])]) | {"name": 'odd"name\\'}
    text = metrics.exposition([d1, d2])
    families = re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)
    names = [n for n, _ in families]
    assert len(names) == len(set(names))                      # one block per family
    assert all(n.endswith("_total") for n, t in families if t == "counter")
    assert not [n for n in names if n.endswith("_ms") or "_ms_" in n]  # base units
    assert re.search(r"^# HELP tcpcopyd_sent_total .+", text, re.M)
    assert 'tcpcopyd_sent_total{instance_name="tcpcopyd.eth0"} 15' in text
    assert 'tcpcopyd_worker_sent_total{instance_name="tcpcopyd.eth0",worker="2"} 5' in text
    assert 'tcpcopyd_sent_bytes_total{instance_name="tcpcopyd.eth0"} 1000' in text
    assert 'tcpcopyd_capture_lag_seconds{instance_name="tcpcopyd.eth0"} 0.25' in text
    assert 'tcpcopyd_state{instance_name="tcpcopyd.eth0",state="healthy"} 1' in text
    assert ('tcpcopyd_interceptd_links_up{instance_name="tcpcopyd.eth0",'
            'interceptd="198.18.2.2:36524"} 2') in text
    assert 'instance_name="odd\\"name\\\\"' in text             # label values escaped


def test_mirror_sources_are_added_up_over_workers_shown_and_exported():
    from shm.segment import SourceState
    one = SourceState("198.18.1.2", 100, 3, 1, 2)
    d = daemon([worker(1), worker(2)])
    d["mirror_sources"] = status.mirror_table([one, SourceState("198.18.1.2", 50, 0, 0, 1),
                                               SourceState("others", 7, 0, 0, 0)])
    assert d["mirror_sources"][0] == {"source": "198.18.1.2", "packets": 150,
                                      "duplicates": 3, "truncated": 1, "gaps": 3}
    assert "  mirror source 198.18.1.2  packets 150  duplicates 3  truncated 1  gaps 3" in \
        status.render(d)
    text = metrics.exposition([d])
    assert ('tcpcopyd_mirror_packets_total{instance_name="tcpcopyd.eth0",source="others"} 7'
            in text)
    assert ('tcpcopyd_mirror_gaps_total{instance_name="tcpcopyd.eth0",source="198.18.1.2"} 3'
            in text)
