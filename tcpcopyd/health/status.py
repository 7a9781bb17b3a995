"""The state of every tcpcopyd/interceptd running on this host, read from their shm segments
(counters, heartbeats, links, live settings) and psutil (CPU, memory, uptime), and judged:

  healthy   every worker serving, every interceptd link up, no drop counter rising, the
            capture lag within half of max_lag
  degraded  serving, but not all of it: a worker stale or waiting to be started again, an
            interceptd with a link down, drops rising, the capture falling behind
  down      not serving: the master is gone (a stale segment), no worker runs, or tcpcopyd
            reaches no interceptd at all (nothing is copied)

``tcpcopyctl status`` prints it (exit 0 healthy, 1 degraded, 3 down or not running);
``tcpcopyd.health.metrics`` exports the same figures for Prometheus."""
from __future__ import annotations

import functools
import signal
import time
from dataclasses import dataclass
from types import ModuleType

from shm import segment as shmseg
from shm import seqlock
from tcpcopyd.health.kinds import KINDS

# what status shows of each mirror source (tcpcopyd --mirror)
MIRROR_FIELDS = ("packets", "duplicates", "truncated", "gaps")
# a worker whose heartbeat is older than this is reported stale
STALE_SECONDS = 5.0
STATES = ("healthy", "degraded", "down")
# tcpctl status's exit code for each state, and when nothing runs
EXIT_CODES = {"healthy": 0, "degraded": 1, "down": 3}
EXIT_NOT_RUNNING = 3
# and when a segment exists that this user may not read
EXIT_NO_ACCESS = 4


def dumps(obj: object) -> str:
    """JSON, with orjson when it is installed (the Debian packages make it optional)."""
    try:
        import orjson
    except ImportError:
        import json
        return json.dumps(obj, indent=2)
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode()


@dataclass
class Found:
    """The segments of the runtime directory: those that can be read, and why the others cannot."""
    segments: list[shmseg.Segment]
    skipped: list[str]       # segments not trusted or not understood, and why
    denied: list[str]        # segments this user may not read


def find_segments() -> Found:
    """The segments of the runtime directory we can trust (attached read-only)."""
    found = Found([], [], [])
    for name in shmseg.list_segments(""):
        try:
            seg = shmseg.attach(name, readonly=True)
        except shmseg.SegmentDenied as e:
            found.denied.append(str(e))
            continue
        except shmseg.SegmentError as e:
            found.skipped.append(str(e))
            continue
        if seg.kind not in KINDS:
            found.skipped.append(f"{seg.path}: unknown kind {seg.kind}")
            seg.close()
            continue
        found.segments.append(seg)
    return found


def worker_pids(seg: shmseg.Segment) -> list[int]:
    out = []
    for i in range(seg.n_workers):
        try:
            out.append(seg.read_worker(i).pid)
        except seqlock.TornRead:
            pass
    return out


@functools.cache
def _psutil() -> ModuleType | None:
    """psutil, if it can work here: a daemon's master under the unit's ProcSubset=pid
    (serving metrics_listen) has no /proc/stat, which psutil reads when imported."""
    try:
        import psutil
    except (ImportError, OSError):
        return None
    return psutil


def proc_info(pid: int) -> dict:
    """The process's figures (CPU %, RSS, uptime, CPUs, title) where they can be read."""
    ps = _psutil()
    if ps is None:
        return {"pid": pid, "alive": shmseg.pid_alive(pid)}
    info: dict = {"pid": pid, "alive": True}
    try:
        p = ps.Process(pid)
        with p.oneshot():
            info["rss_bytes"] = p.memory_info().rss
            info["cpus"] = sorted(p.cpu_affinity())
            info["title"] = " ".join(p.cmdline())
            info["cpu_percent"] = p.cpu_percent(interval=None)
            info["uptime_s"] = time.time() - p.create_time()   # needs /proc/stat
    except ps.NoSuchProcess:
        return {"pid": pid, "alive": False}
    except (ps.AccessDenied, OSError):
        pass
    return info


def prime_cpu(pids: list[int]) -> None:
    """psutil measures CPU % since the previous call: make one now."""
    ps = _psutil()
    for pid in pids if ps else ():
        try:
            ps.Process(pid).cpu_percent(interval=None)
        except (ps.NoSuchProcess, ps.AccessDenied, ValueError, OSError):
            pass


def totals(seg: shmseg.Segment) -> dict[str, int]:
    """The counters of a daemon's workers added up, by name."""
    kind = KINDS.get(seg.kind)
    return seg.totals(kind.names if kind else ())


def exit_words(code: int) -> str:
    """How a worker ended, from its supervision record (-N: killed by signal N)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def link_table(workers: list[dict], now: float) -> list[dict]:
    """The workers' links to each interceptd, added up per address."""
    by_peer: dict[tuple[str, int], dict] = {}
    for w in workers:
        for link in w["links"]:
            peer = by_peer.setdefault((link.host, link.port), {
                "address": link.host, "port": link.port, "links": 0, "up": 0,
                "connects": 0, "errors": 0, "since": None, "reason": ""})
            peer["links"] += link.links
            peer["up"] += link.up
            peer["connects"] += link.connects
            peer["errors"] += link.errors
            peer["reason"] = peer["reason"] or link.reason
            peer.setdefault("_since", []).append((bool(link.up), link.since))
    out = []
    for peer in by_peer.values():
        up = peer["up"] > 0
        sinces = [t for state, t in peer.pop("_since") if state == up]
        peer["state"] = ("up" if peer["up"] == peer["links"] else "partly up") if up \
            else ("down" if peer["errors"] else "connecting")
        peer["since"] = min(sinces) if sinces else None
        peer["for_s"] = now - peer["since"] if peer["since"] else None
        # every connection that came up after the first of each link is a reconnect
        peer["reconnects"] = max(0, peer["connects"] - peer["links"])
        if up:
            peer["reason"] = ""
        out.append(peer)
    return out


def mirror_table(sources: list[shmseg.SourceState]) -> list[dict]:
    """The workers' counts per mirror source (tcpcopyd --mirror), added up per address."""
    by_source: dict[str, dict] = {}
    for src in sources:
        entry = by_source.setdefault(src.address, dict.fromkeys(MIRROR_FIELDS, 0))
        for field in MIRROR_FIELDS:
            entry[field] += getattr(src, field)
    return [{"source": a, **c} for a, c in sorted(by_source.items())]


def judge(d: dict) -> tuple[str, list[str]]:
    """The daemon's state and what keeps it from healthy."""
    down, degraded = [], []
    if not d["master"].get("alive", True):
        down.append(f"master pid {d['master']['pid']} is not running (a stale segment)")
    running = [w for w in d["workers"] if w.get("alive", True) and w["pid"]]
    if not running:
        down.append("no worker is running")
    degraded += _worker_problems(d["workers"])
    if d["program"] == "tcpcopyd":
        online_down, online_degraded = _online_problems(d)
        down += online_down
        degraded += online_degraded
    degraded += [f"{name} rising ({rate:.1f}/s)" for name, rate in d["drops_rising"].items()]
    if down:
        return "down", down + degraded
    return ("degraded" if degraded else "healthy"), degraded


def _worker_problems(workers: list[dict]) -> list[str]:
    """Workers whose heartbeat is late, and those waiting to be started again."""
    out = []
    for w in workers:
        if w.get("pool") == "parked":
            continue      # a pool that gave this worker back (workers = auto)
        age = w["heartbeat_age_s"]
        if age is None or age > STALE_SECONDS:
            out.append(f"worker {w['index']} heartbeat "
                       + ("missing" if age is None else f"{age:.1f}s old"))
        if w["respawn_in_s"]:
            out.append(f"worker {w['index']} {w['last_exit']}; the next one starts in "
                       f"{w['respawn_in_s']:.1f}s")
    return out


def _online_problems(d: dict) -> tuple[list[str], list[str]]:
    """What only tcpcopyd can suffer (down, degraded): no interceptd reachable, links down,
    the capture interface down, a capture lag near max_lag."""
    down, degraded = [], []
    links = d.get("links", [])
    if links and not any(p["up"] for p in links):
        down.append("no interceptd reachable: " + "; ".join(
            f"{p['address']}:{p['port']} {p['state']}"
            + (f" ({p['reason']})" if p["reason"] else "") for p in links))
    else:
        degraded += [f"interceptd {p['address']}:{p['port']}: {p['up']}/{p['links']} "
                     f"links up" + (f" ({p['reason']})" if p["reason"] else "")
                     for p in links if p["up"] < p["links"]]
    if any(w["counters"].get("interface_down") for w in d["workers"]):
        down.append(f"the capture interface {d['label']} is down")
    max_lag = d["settings"].get("max_lag")
    if max_lag and d["lag_ms"] > max_lag * 1000 / 2:
        degraded.append(f"capture lag {d['lag_ms']} ms (max_lag {max_lag * 1000:.0f} ms: "
                        "the worker is falling behind; more workers share the load)")
    return down, degraded


def describe(seg: shmseg.Segment, before: dict[str, int] | None = None,
             elapsed: float = 0.0) -> dict:
    kind = KINDS.get(seg.kind)
    prog = kind.prog if kind else f"kind{seg.kind}"
    master = proc_info(seg.master_pid)
    now = time.time()
    workers, sums, unreadable, sources = [], {}, [], []
    names = kind.names if kind else ()
    for i in range(seg.n_workers):
        try:
            rec = seg.read_worker(i)
        except seqlock.TornRead:
            unreadable.append(i + 1)
            continue
        w = _worker_entry(i, rec, names, now)
        for k, v in w["counters"].items():
            sums[k] = sums.get(k, 0) + v
        sources += rec.sources
        workers.append(w)
    gauges = kind.gauges if kind else frozenset()
    rates = {k: (v - before.get(k, 0)) / elapsed for k, v in sums.items()
             if before is not None and elapsed > 0 and k not in gauges}
    drops = kind.drops if kind else frozenset()
    try:
        live = seg.read_settings()
    except (seqlock.TornRead, ValueError):
        live = {}
    d = {"name": seg.name, "program": prog, "label": seg.label, "master": master,
         "settings": live, "workers": workers, "totals": sums, "rates_per_s": rates,
         "links": link_table(workers, now),
         "mirror_sources": mirror_table(sources),
         "lag_ms": max((w["counters"].get("capture_lag_ms", 0) for w in workers), default=0),
         "drops": {k: sums.get(k, 0) for k in sorted(drops)},
         "drops_rising": {k: rates[k] for k in sorted(drops) if rates.get(k, 0) > 0}}
    state, problems = judge(d)
    problems += [f"worker {i} stopped in the middle of updating its record"
                 for i in unreadable]
    for w in workers:
        w["links"] = [link.__dict__ for link in w["links"]]
    d.update(state=state, healthy=state == "healthy", problems=problems)
    return d


def _worker_entry(i: int, rec, names: tuple[str, ...], now: float) -> dict:
    """One worker as status shows it: its supervision record, process and counters."""
    parked = rec.pool == shmseg.POOL_PARKED
    info = proc_info(rec.pid) if rec.pid and not parked else {"pid": 0, "alive": False}
    return {"index": i + 1, "cpu": rec.cpu, "restarts": rec.restarts,
            "pool": shmseg.POOL_WORDS[rec.pool] if rec.pool < len(shmseg.POOL_WORDS)
            else str(rec.pool),
            "recent_deaths": rec.recent_deaths,
            "last_exit": exit_words(rec.last_exit) if rec.restarts or rec.recent_deaths
            else None,
            "respawn_in_s": max(0.0, rec.respawn_at - now) if rec.respawn_at > now else None,
            "heartbeat_age_s": now - rec.heartbeat if rec.heartbeat and not parked else None,
            **info, "counters": dict(zip(names, rec.counters, strict=False)),
            "links": rec.links}


def sample(segs: list[shmseg.Segment], interval: float) -> list[dict]:
    """Every daemon described, rates and CPU % measured over ``interval`` seconds."""
    for s in segs:
        prime_cpu([s.master_pid, *worker_pids(s)])
    before = [totals(s) for s in segs]
    t0 = time.monotonic()
    time.sleep(interval)
    elapsed = time.monotonic() - t0
    return [describe(s, b, elapsed) for s, b in zip(segs, before, strict=True)]


def exit_code(report: list[dict]) -> int:
    return max((EXIT_CODES[d["state"]] for d in report), default=EXIT_NOT_RUNNING)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return (f"{seconds // 86400}d{seconds % 86400 // 3600}h" if seconds >= 86400 else
            f"{seconds // 3600}h{seconds % 3600 // 60}m" if seconds >= 3600 else
            f"{seconds // 60}m{seconds % 60}s" if seconds >= 60 else f"{seconds}s")


def render(d: dict) -> str:
    lines = [f"{d['program']} {d['name']} [{d['label']}]: {d['state'].upper()}"
             + ("" if not d["problems"] else ": " + "; ".join(d["problems"]))]
    m = d["master"]
    lines.append(f"  master   pid {m['pid']:<7} " + _process_words(m))
    lines += [_worker_line(w) for w in d["workers"]]
    for p in d["links"]:
        lines.append(f"  interceptd {p['address']}:{p['port']}  {p['state']} "
                     f"({p['up']}/{p['links']} links) for {_ago(p['for_s'])}  "
                     f"reconnects {p['reconnects']}"
                     + (f"  last error: {p['reason']}" if p["reason"] else ""))
    for m in d.get("mirror_sources", []):
        lines.append(f"  mirror source {m['source']}  packets {m['packets']}  duplicates "
                     f"{m['duplicates']}  truncated {m['truncated']}  gaps {m['gaps']}")
    if d["program"] == "tcpcopyd":
        lines.append(f"  capture lag {d['lag_ms']} ms"
                     + (f" (max_lag {d['settings']['max_lag'] * 1000:.0f} ms)"
                        if d["settings"].get("max_lag") else ""))
    lines.append(_drops_line(d))
    if d.get("settings"):
        lines.append("  settings " + " ".join(f"{k}={_short(v)}" for k, v in
                                              sorted(d["settings"].items())))
    width = max((len(k) for k in d["totals"]), default=0)
    for k, v in d["totals"].items():
        if v:
            rate = d["rates_per_s"].get(k)
            lines.append(f"    {k:<{width}} {v:>12}" + (f"  {rate:10.1f}/s" if rate else ""))
    return "\n".join(lines)


def _process_words(p: dict) -> str:
    """CPU, memory and uptime of a master or worker process, or that it is not running."""
    if not p.get("alive", True):
        return "not running"
    return (f"cpu {p.get('cpu_percent', 0):5.1f}%  rss {p.get('rss_bytes', 0) >> 20} MiB  "
            f"up {_ago(p.get('uptime_s'))}")


def _worker_line(w: dict) -> str:
    if w.get("pool") == "parked":
        return f"  worker {w['index']} parked (the pool does not need it now)"
    hb = w["heartbeat_age_s"]
    return (f"  worker {w['index']} pid {w['pid']:<7} cpu={w['cpu']} " + _process_words(w)
            + ("  retiring" if w.get("pool") == "retiring" else "")
            + f"  restarts {w['restarts']}"
            + (f" ({w['recent_deaths']} recent, last {w['last_exit']})"
               if w["recent_deaths"] else "")
            + "  heartbeat " + ("-" if hb is None else f"{hb:.1f}s ago"))


def _drops_line(d: dict) -> str:
    drops = {k: v for k, v in d["drops"].items() if v}
    return "  drops " + (", ".join(
        f"{k} {v}" + (f" (rising {d['drops_rising'][k]:.1f}/s)" if k in d["drops_rising"]
                      else "") for k, v in drops.items()) if drops else "none")


def _short(v: object) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    return "-" if v is None else str(v)
