"""The Prometheus text exposition (version 0.0.4) of running daemons, from their status
(``tcpcopyd.health.status.describe``): every counter and gauge of the workers, added up per
instance (``tcpcopyd_sent_total``) and per worker (``tcpcopyd_worker_sent_total``), the
state, the workers' supervision and processes, and tcpcopyd's links to each interceptd.

Names follow Prometheus's conventions: the daemon as prefix, counters end in ``_total``,
base units (seconds, bytes) in the name. Labels: ``instance_name`` (the daemon's instance:
its shm segment; ``instance`` is the scrape target's, set by Prometheus), ``worker`` (1..N),
``interceptd`` (ADDRESS:PORT)."""
from __future__ import annotations

import ipaddress
import logging
import math
import os
import tempfile
from collections.abc import Iterable

from shm.segment import Segment
from tcpcopyd.health.kinds import by_prog
from tcpcopyd.health.status import STATES, describe
from tcpcopyd.service.pageserver import PageServer
from tcpcopyd.service.settings import Config, version

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# counters whose name says a unit, by counter name: (metric name, factor to base units)
RENAMED = {
    "bytes_sent": ("sent_bytes", 1),
    "capture_lag_ms": ("capture_lag_seconds", 0.001),
    "capture_lag_peak_ms": ("capture_lag_peak_seconds", 0.001),
    "interface_down_ms": ("interface_down_seconds", 0.001),
}

log = logging.getLogger("tcpcopyd.metrics")


class Families:
    """Metric families in the order first declared, each with its samples."""

    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, list[tuple[dict[str, str], float]]]] = {}

    def add(self, name: str, kind: str, help: str, labels: dict[str, str],
            value: float) -> None:
        family = self.families.setdefault(name, (kind, help, []))
        family[2].append((labels, value))

    def render(self) -> str:
        out = []
        for name, (kind, help, samples) in self.families.items():
            out.append(f"# HELP {name} {_escape_help(help)}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{_labels(labels)} {_number(value)}")
        return "\n".join(out) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def counter_metric(name: str, gauge: bool) -> tuple[str, float]:
    """(metric name without prefix, factor) of a counter of the shm record."""
    base, factor = RENAMED.get(name, (name, 1))
    return (base if gauge else f"{base}_total"), factor


def add_daemon(f: Families, d: dict) -> None:
    """One daemon's figures (a ``status.describe`` result)."""
    prog = d["program"]
    daemon = by_prog(prog)
    inst = {"instance_name": d["name"]}
    for state in STATES:
        f.add(f"{prog}_state", "gauge", f"1 for the state {prog} is in (healthy: all "
              "serving; degraded: serving in part; down: not serving), 0 for the others",
              {**inst, "state": state}, int(d["state"] == state))
    f.add(f"{prog}_workers", "gauge", "worker processes configured", inst, len(d["workers"]))
    f.add(f"{prog}_workers_running", "gauge", "worker processes running", inst,
          sum(1 for w in d["workers"] if w.get("alive", True) and w["pid"]))
    master = d["master"]
    f.add(f"{prog}_master_up", "gauge", "1 while the master process runs", inst,
          int(master.get("alive", True)))
    if "rss_bytes" in master:
        f.add(f"{prog}_resident_memory_bytes", "gauge", "resident memory of each process",
              {**inst, "process": "master"}, master["rss_bytes"])
    for w in d["workers"]:
        if "rss_bytes" in w:
            f.add(f"{prog}_resident_memory_bytes", "gauge", "resident memory of each process",
                  {**inst, "process": f"worker{w['index']}"}, w["rss_bytes"])
    for w in d["workers"]:
        lw = {**inst, "worker": str(w["index"])}
        f.add(f"{prog}_worker_restarts_total", "counter",
              "workers started again at this index after one ended", lw, w["restarts"])
        if w["heartbeat_age_s"] is not None:
            f.add(f"{prog}_worker_heartbeat_age_seconds", "gauge",
                  "time since the worker last wrote its record", lw,
                  round(w["heartbeat_age_s"], 3))
    for name in daemon.names:
        gauge = name in daemon.gauges
        metric, factor = counter_metric(name, gauge)
        help = daemon.help[name].removeprefix("gauge: ")
        kind = "gauge" if gauge else "counter"
        total = d["totals"].get(name, 0)
        f.add(f"{prog}_{metric}", kind, help + " (all workers)", inst,
              total * factor if factor != 1 else total)
        for w in d["workers"]:
            v = w["counters"].get(name, 0)
            f.add(f"{prog}_worker_{metric}", kind, help, {**inst, "worker": str(w["index"])},
                  v * factor if factor != 1 else v)
    for m in d.get("mirror_sources", []):
        lm = {**inst, "source": m["source"]}
        for field, help in (("packets", "client packets this mirror source delivered"),
                            ("duplicates", "packets it delivered twice (skipped)"),
                            ("truncated", "packets it delivered cut short"),
                            ("gaps", "gaps its packets opened in a client's stream")):
            f.add(f"{prog}_mirror_{field}_total", "counter",
                  f"--mirror: {help} (all workers)", lm, m[field])
    for p in d.get("links", []):
        lp = {**inst, "interceptd": f"{p['address']}:{p['port']}"}
        f.add(f"{prog}_interceptd_links", "gauge",
              "control connections to this interceptd (all workers)", lp, p["links"])
        f.add(f"{prog}_interceptd_links_up", "gauge",
              "control connections to this interceptd that are up", lp, p["up"])
        f.add(f"{prog}_interceptd_reconnects_total", "counter",
              "control connections to this interceptd that came up again", lp,
              p["reconnects"])
        f.add(f"{prog}_interceptd_link_errors_total", "counter",
              "control connections to this interceptd lost or refused", lp, p["errors"])
        if p["since"]:
            f.add(f"{prog}_interceptd_state_since_timestamp_seconds", "gauge",
                  "when the links to this interceptd got to their current state (Unix time)",
                  lp, round(p["since"], 3))


def exposition(daemons: Iterable[dict]) -> str:
    f = Families()
    f.add("tcpcopyd_build_info", "gauge", "the release of tcpcopyd's code (value 1)",
          {"version": version()}, 1)
    for d in daemons:
        add_daemon(f, d)
    return f.render()


def write_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` in one step (node-exporter's textfile collector must
    never read half a file): a temporary file in the same directory, then rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tcpcopyd-metrics.", dir=directory)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def page_server(cfg: Config, seg: Segment) -> PageServer | None:
    """A master's ``metrics_listen``: its own daemon's figures at GET /metrics (None when
    off; ConfigError naming the setting if its address cannot be listened on)."""
    if not cfg.metrics_listen:
        return None
    host, port = cfg.metrics_listen
    if not ipaddress.ip_address(host).is_loopback:
        log.warning("metrics_listen %s:%d is not a loopback address: every host that reaches "
                    "it reads this daemon's counters and link addresses (firewall it, or "
                    "listen on 127.0.0.1 behind the scraper's proxy)", host, port)
    try:
        return PageServer(host, port, lambda: exposition([describe(seg)]), CONTENT_TYPE)
    except OSError as e:
        raise cfg.invalid("metrics_listen", f"cannot listen: {e.strerror}") from None
