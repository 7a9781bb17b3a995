"""The benchmark's pictures as a self-contained SVG (no plotting library): CPU per
replicated request against the offered rate for each pair and daemon, and the
distribution (CDF) of the copies' added delay for each pair and rate."""
from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT = 1060, 420
PANEL = 420            # width of a panel's plot area
MARGIN = (70, 40, 60)  # left, top, bottom
COLORS = {("ours", "tcpcopyd"): "#1f77b4", ("ours", "interceptd"): "#6baed6",
          ("c", "tcpcopyd"): "#d62728", ("c", "interceptd"): "#ff9896",
          ("compare", "tcpcopyd"): "#2ca02c", ("compare", "interceptd"): "#98df8a"}
# how a pair of tools/bench is named in the legend
PAIR_NAMES = {"ours": "ours", "c": "C", "compare": "ours --compare"}
DASHES = ["", "6 3", "2 3", "8 3 2 3"]


def _axes(x0: float, title: str, xlabel: str, ylabel: str, xticks, yticks,
          fx, fy) -> list[str]:
    top, bottom = MARGIN[1], HEIGHT - MARGIN[2]
    out = [f'<text x="{x0 + PANEL / 2}" y="22" text-anchor="middle" font-weight="bold">'
           f'{escape(title)}</text>',
           f'<line x1="{x0}" y1="{bottom}" x2="{x0 + PANEL}" y2="{bottom}" stroke="black"/>',
           f'<line x1="{x0}" y1="{top}" x2="{x0}" y2="{bottom}" stroke="black"/>',
           f'<text x="{x0 + PANEL / 2}" y="{HEIGHT - 18}" text-anchor="middle">'
           f'{escape(xlabel)}</text>',
           f'<text x="{x0 - 50}" y="{(top + bottom) / 2}" text-anchor="middle" '
           f'transform="rotate(-90 {x0 - 50} {(top + bottom) / 2})">{escape(ylabel)}</text>']
    for v in xticks:
        out.append(f'<text x="{fx(v):.1f}" y="{bottom + 16}" text-anchor="middle" '
                   f'font-size="11">{v:g}</text>')
    for v in yticks:
        out.append(f'<text x="{x0 - 6}" y="{fy(v) + 4:.1f}" text-anchor="end" '
                   f'font-size="11">{v:g}</text>')
        out.append(f'<line x1="{x0}" y1="{fy(v):.1f}" x2="{x0 + PANEL}" y2="{fy(v):.1f}" '
                   'stroke="#ddd"/>')
    return out


def _ticks(hi: float, n: int = 5) -> list[float]:
    step = max(hi / n, 1e-9)
    mag = 10 ** len(str(int(step))) / 10 if step >= 1 else 0.1
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= step)
    return [i * step for i in range(int(hi / step) + 2)]


def bench_svg(rows: list) -> str:
    """``rows``: (rate, (workers, mode, pair), summary, runs) as tools/bench makes them."""
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>']
    top, bottom = MARGIN[1], HEIGHT - MARGIN[2]
    # panel 1: µs per request against rate
    x0 = MARGIN[0]
    rates = sorted({r[0] for r in rows})
    lines: dict[tuple, list[tuple[float, float]]] = {}
    for rate, (_w, _m, pair), m, _runs in rows:
        for daemon in ("tcpcopyd", "interceptd"):
            lines.setdefault((pair, daemon), []).append((rate, m[f"{daemon}_us_per_req"]))
    ymax = max((y for pts in lines.values() for _, y in pts), default=1.0) * 1.1
    xmax = max(rates) * 1.05

    def fx(v: float) -> float:
        return x0 + PANEL * v / xmax

    def fy(v: float) -> float:
        return bottom - (bottom - top) * v / ymax
    out += _axes(x0, "CPU per replicated request", "offered requests/s", "µs of CPU",
                 rates, _ticks(ymax), fx, fy)
    for i, ((pair, daemon), pts) in enumerate(sorted(lines.items())):
        color = COLORS.get((pair, daemon), "black")
        path = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y in sorted(pts))
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" '
                   'stroke-width="2"/>')
        for x, y in pts:
            out.append(f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="3" fill="{color}"/>')
        name = f"{PAIR_NAMES.get(pair, pair)} {daemon}"
        out.append(f'<text x="{x0 + 10}" y="{top + 14 + 15 * i}" fill="{color}">'
                   f'{escape(name)}</text>')
    # panel 2: CDF of the first data segment's added delay (ms, log scale)
    x0 = MARGIN[0] + PANEL + 90
    curves = [(rate, pair, sorted(m["data_delay"])) for rate, (_w, _m, pair), m, _r in rows
              if m.get("data_delay")]
    if curves:
        lo = max(min(c[2][0] for c in curves) * 1000, 0.01)
        hi = max(c[2][-1] for c in curves) * 1000
        llo, lhi = math.log10(lo), math.log10(max(hi, lo * 10))

        def gx(ms: float) -> float:
            return x0 + PANEL * (math.log10(max(ms, lo)) - llo) / (lhi - llo)

        def gy(p: float) -> float:
            return bottom - (bottom - top) * p
        decades = [10 ** e for e in range(math.floor(llo), math.ceil(lhi) + 1)
                   if llo <= e <= lhi]
        out += _axes(x0, "Added delay of the first data segment (CDF)",
                     "ms, online interface to target interface (log)", "share of copies",
                     decades, [0, 0.25, 0.5, 0.75, 0.9, 1], gx, gy)
        for i, (rate, pair, values) in enumerate(curves):
            color = COLORS[(pair, "tcpcopyd")]
            dash = DASHES[sorted({c[0] for c in curves}).index(rate) % len(DASHES)]
            n = len(values)
            step = max(1, n // 400)
            pts = [(gx(v * 1000), gy((j + 1) / n)) for j, v in enumerate(values)
                   if j % step == 0 or j == n - 1]
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" '
                       f'stroke-width="2" stroke-dasharray="{dash}"/>')
            name = f"{PAIR_NAMES.get(pair, pair)} {rate}/s"
            ly = bottom - 10 - 15 * i
            out.append(f'<line x1="{x0 + PANEL - 140}" y1="{ly - 4}" x2="{x0 + PANEL - 116}" '
                       f'y2="{ly - 4}" stroke="{color}" stroke-width="2" '
                       f'stroke-dasharray="{dash}"/>')
            out.append(f'<text x="{x0 + PANEL - 110}" y="{ly}" '
                       f'fill="{color}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
