"""`tcpcopyctl report FILE`: the comparison test's summary from its JSON lines
(``compare_log``): exchanges compared, status mismatches by pair (200→500) and by path,
size and content differences, latency (time to the answer's last byte) p50/p90/p99 online
and on the target and their ratio, the slowest paths; ``--json`` the same as JSON, ``--html
OUT`` one self-contained page with the same numbers and pictures (latency distributions,
mismatch table, timeline of rate and latency)."""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from html import escape

from tcpcopyd.online import answers

SLOWEST = 10


class ReportError(RuntimeError):
    """A file that cannot be read as a comparison log."""


def read(path: str, skipped: list | None = None) -> Iterator[dict]:
    """The records of a compare_log file, each checked field by field (``record``). A
    line that is not one is skipped and appended to ``skipped`` as ``"FILE:LINE: why"``;
    a file none of whose lines is a record is a ReportError naming its first bad line."""
    skipped = [] if skipped is None else skipped
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        raise ReportError(f"{path}: {e.strerror}") from None
    good = 0
    with f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                data = json.loads(line)
            except ValueError:
                skipped.append(f"{path}:{n}: not a JSON line of compare_log")
                continue
            try:
                rec = record(data)
            except ValueError as e:
                skipped.append(f"{path}:{n}: {e}")
                continue
            good += 1
            yield rec
    if skipped and not good:
        raise ReportError(skipped[0])


def _number(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
            or v < 0 or v > 1e15:
        raise ValueError(f"{what} is not a number of compare_log")
    return float(v)


def _side(v: object, what: str) -> dict | None:
    """One side's answer (online or target) with the fields the report reads checked."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ValueError(f"{what} is not an answer of compare_log")
    out = dict(v)
    if out.get("ttlb_ms") is not None:
        out["ttlb_ms"] = _number(out["ttlb_ms"], f"{what}.ttlb_ms")
    status = out.get("status")
    if status is not None and (isinstance(status, bool) or not isinstance(status, int | str)):
        raise ValueError(f"{what}.status is not a status")
    if out.get("first") is not None and not isinstance(out["first"], str):
        raise ValueError(f"{what}.first is not text")
    return out


def record(rec: object) -> dict:
    """A compare_log record whose fields have the types the report reads; ValueError
    says which field is wrong."""
    if not isinstance(rec, dict) or "request" not in rec:
        raise ValueError("not a record of compare_log")
    if not isinstance(rec["request"], str):
        raise ValueError("request is not text")
    out = dict(rec)
    out["ts"] = _number(rec.get("ts", 0), "ts")
    if out.get("path") is not None and not isinstance(out["path"], str):
        raise ValueError("path is not text")
    out["online"] = _side(rec.get("online"), "online")
    out["target"] = _side(rec.get("target"), "target")
    for key in ("same_status", "same_size", "same_content"):
        if out.get(key) is not None and not isinstance(out[key], bool):
            raise ValueError(f"{key} is not true or false")
    return out


def printable(text: str) -> str:
    """``text`` with control characters (terminal escape sequences: they come from
    production requests) shown as \\xNN, never sent to the terminal."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256
                   else f"\\u{ord(c):04x}" for c in text)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of ``values``."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def _pcts(values: list[float]) -> dict:
    return {f"p{q}": (None if (v := percentile(values, q)) is None else round(v, 3))
            for q in (50, 90, 99)}


class _Tally:
    """The report's counts and latencies, added up record by record."""

    def __init__(self, rules: answers.Rules | None) -> None:
        self.rules = rules
        self.exchanges = self.compared = self.size_diff = self.content_diff = 0
        self.online_only = self.target_only = 0
        self.pairs: Counter = Counter()
        self.by_path: Counter = Counter()
        self.lat_o: list[float] = []
        self.lat_t: list[float] = []
        self.path_lat: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
        self.per_second: dict[int, list] = defaultdict(lambda: [0, [], []])
        self.start: float | None = None

    def add(self, rec: dict) -> None:
        self.exchanges += 1
        o, t = rec.get("online"), rec.get("target")
        path = rec.get("path") or answers.path_of(answers.as_bytes(rec["request"]))
        if self.start is None:
            self.start = rec.get("ts", 0)
        sec = self.per_second[int(rec.get("ts", 0) - self.start)]
        sec[0] += 1
        for side, lat, i in ((o, self.lat_o, 0), (t, self.lat_t, 1)):
            if side and side.get("ttlb_ms") is not None:
                lat.append(side["ttlb_ms"])
                self.path_lat[path][i].append(side["ttlb_ms"])
                sec[1 + i].append(side["ttlb_ms"])
        if not (o and t):
            self.online_only += bool(o)
            self.target_only += bool(t)
            return
        self.compared += 1
        if rec.get("same_status") is False:
            self.pairs[f"{o.get('status')}→{t.get('status')}"] += 1
            self.by_path[path] += 1
        if rec.get("same_size") is False:
            self.size_diff += 1
        if self._same_content(rec, o, t) is False:
            self.content_diff += 1

    def _same_content(self, rec: dict, o: dict, t: dict) -> bool | None:
        """As the log says, or judged again with the report's own noise rules."""
        if self.rules is None or o.get("first") is None or t.get("first") is None:
            return rec.get("same_content")
        a, b = answers.as_bytes(o["first"]), answers.as_bytes(t["first"])
        n = min(len(a), len(b))
        return self.rules.clean(a[:n]) == self.rules.clean(b[:n])

    def slowest(self) -> list[dict]:
        """The paths by the target's p90 answer time, slowest first."""
        out = []
        for path, (lo, lt) in self.path_lat.items():
            if lt:
                o90, t90 = percentile(lo, 90), percentile(lt, 90)
                out.append({"path": path, "exchanges": max(len(lo), len(lt)),
                            "online_p90_ms": o90, "target_p90_ms": t90,
                            "ratio": round(t90 / o90, 2) if o90 else None})
        out.sort(key=lambda p: -(p["target_p90_ms"] or 0))
        return out[:SLOWEST]


def summarize(records: Iterable[dict], ignore: list[str] | None = None,
              skipped: list[str] | None = None) -> dict:
    """The report's numbers; ``ignore``: the contents judged again with these noise rules
    (instead of those the log was written with); ``skipped``: the lines ``read`` skipped
    (filled while ``records`` is read)."""
    tally = _Tally(answers.Rules.parse(ignore) if ignore else None)
    for rec in records:
        tally.add(rec)
    po, pt = _pcts(tally.lat_o), _pcts(tally.lat_t)
    return {
        "exchanges": tally.exchanges, "compared": tally.compared,
        "status_mismatches": sum(tally.pairs.values()),
        "status_mismatch_pairs": dict(tally.pairs.most_common()),
        "status_mismatches_by_path": dict(tally.by_path.most_common()),
        "size_differences": tally.size_diff, "content_differences": tally.content_diff,
        "online_only": tally.online_only, "target_only": tally.target_only,
        "online_latency_ms": po, "target_latency_ms": pt,
        "latency_ratio": {k: (round(pt[k] / po[k], 2) if po[k] and pt[k] is not None
                              else None) for k in po},
        "slowest_paths": tally.slowest(),
        "timeline": [{"second": s, "exchanges": v[0],
                      "online_p50_ms": percentile(v[1], 50),
                      "target_p50_ms": percentile(v[2], 50)}
                     for s, v in sorted(tally.per_second.items())],
        "skipped": len(skipped or ()),
        "first_skipped": skipped[0] if skipped else None,
        "_latencies": (sorted(tally.lat_o), sorted(tally.lat_t)),
    }


def public(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.startswith("_")}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def text(summary: dict) -> str:
    s = summary
    lines = [f"exchanges {s['exchanges']}, compared {s['compared']} (online only "
             f"{s['online_only']}, target only {s['target_only']})",
             f"status mismatches {s['status_mismatches']}"
             + "".join(f"\n  {printable(pair)}: {n}"
                       for pair, n in s["status_mismatch_pairs"].items()),
             "  by path:" + "".join(f"\n    {printable(p)}: {n}" for p, n in
                                   s["status_mismatches_by_path"].items())
             if s["status_mismatches_by_path"] else "",
             f"size differences {s['size_differences']}, content differences "
             f"{s['content_differences']}",
             "latency ms (to the last byte)   p50      p90      p99"]
    for side in ("online", "target"):
        p = s[f"{side}_latency_ms"]
        lines.append(f"  {side:<29}{_ms(p['p50']):>8} {_ms(p['p90']):>8} {_ms(p['p99']):>8}")
    r = s["latency_ratio"]
    lines.append(f"  {'target / online':<29}{_ms(r['p50']):>8} {_ms(r['p90']):>8} "
                 f"{_ms(r['p99']):>8}")
    if s["slowest_paths"]:
        lines.append("slowest paths on the target (p90 ms: online, target, ratio)")
        for p in s["slowest_paths"]:
            lines.append(f"  {printable(p['path']):<40} {_ms(p['online_p90_ms']):>8} "
                         f"{_ms(p['target_p90_ms']):>8} {_ms(p['ratio']):>6}"
                         f"  ({p['exchanges']})")
    if s["skipped"]:
        lines.append(f"skipped {s['skipped']} line(s) that are not records of compare_log "
                     f"(first: {printable(s['first_skipped'])})")
    return "\n".join(line for line in lines if line)


# ------------------------------------------------------------------ the HTML page
W, H, PAD = 640, 300, 50


def _svg_cdf(online: list[float], target: list[float]) -> str:
    top = max([*online, *target, 1.0])
    scale = math.log10(top + 1)

    def path(values: list[float]) -> str:
        if not values:
            return ""
        pts = []
        for i, v in enumerate(values):
            x = PAD + (W - 2 * PAD) * math.log10(v + 1) / scale
            y = H - PAD - (H - 2 * PAD) * (i + 1) / len(values)
            pts.append(f"{x:.1f},{y:.1f}")
        return " ".join(pts)
    ticks = "".join(
        f'<text x="{PAD + (W - 2 * PAD) * math.log10(v + 1) / scale:.1f}" y="{H - PAD + 16}"'
        f' text-anchor="middle" font-size="11">{v:g}</text>'
        for v in (0.1, 1, 10, 100, 1000, 10000) if v <= top)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}">'
            f'<rect width="{W}" height="{H}" fill="white"/>'
            f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="black"/>'
            f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="black"/>{ticks}'
            f'<text x="{W / 2}" y="{H - 10}" text-anchor="middle" font-size="12">latency, '
            f'ms (log)</text>'
            f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{path(online)}"/>'
            f'<polyline fill="none" stroke="#d62728" stroke-width="2" '
            f'stroke-dasharray="6 3" points="{path(target)}"/>'
            f'<text x="{W - PAD - 120}" y="{PAD + 10}" fill="#1f77b4" font-size="12">'
            f'online</text><text x="{W - PAD - 60}" y="{PAD + 10}" fill="#d62728" '
            f'font-size="12">target</text></svg>')


def _svg_timeline(timeline: list[dict]) -> str:
    if not timeline:
        return "<p>no exchanges</p>"
    n = max(t["second"] for t in timeline) + 1
    top_rate = max(t["exchanges"] for t in timeline) or 1
    top_lat = max([t[k] or 0 for t in timeline for k in ("online_p50_ms", "target_p50_ms")]
                  + [1.0])

    def x(sec: int) -> float:
        return PAD + (W - 2 * PAD) * (sec + 0.5) / n

    def y(value: float, top: float) -> float:
        return H - PAD - (H - 2 * PAD) * value / top
    bars = "".join(
        f'<rect x="{x(t["second"]) - 2:.1f}" width="4" y="{y(t["exchanges"], top_rate):.1f}"'
        f' height="{H - PAD - y(t["exchanges"], top_rate):.1f}" fill="#bbbbbb"/>'
        for t in timeline)

    def line(key: str, colour: str) -> str:
        pts = " ".join(f"{x(t['second']):.1f},{y(t[key], top_lat):.1f}"
                       for t in timeline if t[key] is not None)
        return f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>'
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}">'
            f'<rect width="{W}" height="{H}" fill="white"/>{bars}'
            f'{line("online_p50_ms", "#1f77b4")}{line("target_p50_ms", "#d62728")}'
            f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="black"/>'
            f'<text x="{W / 2}" y="{H - 10}" text-anchor="middle" font-size="12">seconds '
            f'(grey: exchanges per second, max {top_rate}; lines: latency p50, max '
            f'{top_lat:.1f} ms)</text></svg>')


def html(summary: dict, title: str) -> str:
    s = summary
    online, target = s["_latencies"]

    def cell(key: str, value: object) -> str:
        return f'<td id="{key}">{escape(str(value))}</td>'
    numbers = "".join(
        f"<tr><th>{escape(label)}</th>{cell(key, s[key])}</tr>"
        for key, label in (("exchanges", "exchanges"), ("compared", "compared"),
                           ("status_mismatches", "status mismatches"),
                           ("size_differences", "size differences"),
                           ("content_differences", "content differences"),
                           ("online_only", "online only"), ("target_only", "target only")))
    lat = "".join(
        f"<tr><th>{side}</th>" + "".join(
            cell(f"{side}_latency_ms.{q}", _ms(s[f'{side}_latency_ms'][q]))
            for q in ("p50", "p90", "p99")) + "</tr>"
        for side in ("online", "target"))
    lat += "<tr><th>target / online</th>" + "".join(
        cell(f"latency_ratio.{q}", _ms(s["latency_ratio"][q])) for q in ("p50", "p90", "p99")
    ) + "</tr>"
    pairs = "".join(f"<tr><td>{escape(p)}</td><td>{n}</td></tr>"
                    for p, n in s["status_mismatch_pairs"].items()) or \
        '<tr><td colspan="2">none</td></tr>'
    paths = "".join(f"<tr><td>{escape(p)}</td><td>{n}</td></tr>"
                    for p, n in s["status_mismatches_by_path"].items()) or \
        '<tr><td colspan="2">none</td></tr>'
    slow = "".join(f"<tr><td>{escape(p['path'])}</td><td>{p['exchanges']}</td>"
                   f"<td>{_ms(p['online_p90_ms'])}</td><td>{_ms(p['target_p90_ms'])}</td>"
                   f"<td>{_ms(p['ratio'])}</td></tr>" for p in s["slowest_paths"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:72em}}
table{{border-collapse:collapse;margin:0.5em 0 1.5em}}
td,th{{border:1px solid #ccc;padding:0.25em 0.6em;text-align:right}}
th{{text-align:left;background:#f4f4f4}}</style></head><body>
<h1>{escape(title)}</h1>
<h2>Exchanges</h2><table>{numbers}</table>
<h2>Latency to the last byte, ms</h2>
<table><tr><th></th><th>p50</th><th>p90</th><th>p99</th></tr>{lat}</table>
<h2>Latency distributions</h2>{_svg_cdf(online, target)}
<h2>Status mismatches</h2>
<table><tr><th>online → target</th><th>exchanges</th></tr>{pairs}</table>
<table><tr><th>path</th><th>mismatches</th></tr>{paths}</table>
<h2>Slowest paths on the target</h2>
<table><tr><th>path</th><th>exchanges</th><th>online p90</th><th>target p90</th>
<th>ratio</th></tr>{slow}</table>
<h2>Timeline</h2>{_svg_timeline(s["timeline"])}
</body></html>
"""
