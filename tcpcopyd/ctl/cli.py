"""`tcpcopyctl status [--json] [NAME]`: every running tcpcopyd/interceptd on this host and
whether it is healthy, degraded or down (tcpcopyd.health.status). `tcpcopyctl metrics`: the same
figures in Prometheus's text format (tcpcopyd.health.metrics). `tcpcopyctl doctor`: see
tcpcopyd.ctl.doctor."""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import interceptd.counters  # noqa: F401  (registers interceptd's segments)
import tcpcopyd.online.counters  # noqa: F401  (registers tcpcopyd's segments)
from tcpcopyd.health import metrics
from tcpcopyd.health import status as st
from tcpcopyd.online import answers
from tcpcopyd.service.settings import version


def _segments(name: str | None) -> tuple[list, int | None]:
    """The segments to report on, or the exit code when there are none."""
    found = st.find_segments()
    for why in found.skipped:
        print(f"tcpcopyctl: skipped {why}", file=sys.stderr)
    for why in found.denied:
        print(f"tcpcopyctl: {why}", file=sys.stderr)
    segs = [s for s in found.segments if not name or s.name == name]
    if segs:
        return segs, None
    if found.denied and not name:
        return [], st.EXIT_NO_ACCESS
    print("tcpcopyctl: no tcpcopyd or interceptd is running on this host"
          + (f" under the name {name!r}" if name else ""), file=sys.stderr)
    return [], st.EXIT_NOT_RUNNING


def status(args: argparse.Namespace) -> int:
    segs, code = _segments(args.name)
    if code is not None:
        return code
    report = st.sample(segs, args.interval)
    if args.json:
        sys.stdout.write(st.dumps(report) + "\n")
    else:
        print("\n\n".join(st.render(d) for d in report))
    return st.exit_code(report)


def show_metrics(args: argparse.Namespace) -> int:
    found = st.find_segments()
    for why in found.skipped + found.denied:
        print(f"tcpcopyctl: {why}", file=sys.stderr)
    text = metrics.exposition(st.describe(s) for s in found.segments)
    if args.output:
        try:
            metrics.write_atomically(args.output, text)
        except OSError as e:
            print(f"tcpcopyctl: cannot write {args.output}: {e.strerror}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return st.EXIT_NO_ACCESS if found.denied and not found.segments else 0


def show_report(args: argparse.Namespace) -> int:
    from tcpcopyd.ctl import report
    from tcpcopyd.online import comparelog
    try:
        skipped: list[str] = []
        summary = report.summarize(report.read(args.file, skipped), args.ignore, skipped)
        if args.html:
            with comparelog.open_private(args.html, "w") as f:
                f.write(report.html(summary, f"tcpcopyd comparison: {args.file}"))
    except report.ReportError as e:
        print(f"tcpcopyctl: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"tcpcopyctl: {e}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(st.dumps(report.public(summary)) + "\n")
    else:
        print(report.text(summary))
    return 0


def release_guard(args: argparse.Namespace) -> int:
    """The operator lifts an interceptd's guard: the target's replies on its service
    ports go where the target routes them again (to the real clients, if they are on the
    way). Nothing else does this: interceptd leaves its guard in place when it stops."""
    from interceptd import rules
    try:
        n = rules.release_guard(args.instance)
    except rules.RuleError as e:
        print(f"tcpcopyctl: {e}", file=sys.stderr)
        return 1
    print(f"removed {n} guard rule(s) of interceptd {args.instance!r}" if n else
          f"interceptd {args.instance!r} has no guard rule here")
    return 0


def interval(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and 0.05 <= v <= 3600):
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds from 0.05 to 3600")
    return v


def noise_rule(text: str) -> str:
    try:
        return answers.check_rule(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    """tcpcopyctl's command line (also the source of its man page)."""
    ap = argparse.ArgumentParser(prog="tcpcopyctl", description="Inspect tcpcopyd/interceptd.")
    ap.add_argument("--version", action="version", version=f"tcpcopyctl {version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("status", help="processes, links, drops, counters and the state "
                        "(healthy, degraded, down) of the running daemons; exit 0 healthy, "
                        "1 degraded, 3 down or not running, 4 not allowed to read them")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--interval", type=interval, default=1.0, metavar="SECONDS",
                    help="rates and rising drops are measured over this long (default 1)")
    sp.add_argument("name", nargs="?", help="only this instance (shm segment name)")
    mp = sub.add_parser("metrics", help="every running daemon's counters, gauges and state "
                        "in Prometheus's text format")
    mp.add_argument("--output", metavar="FILE", help="write them to FILE atomically (for "
                    "node-exporter's textfile collector) instead of standard output")
    rp = sub.add_parser("report", help="the comparison test's summary from a compare_log "
                        "file: mismatches by status pair and path, size and content "
                        "differences, latency online and on the target, the slowest paths")
    rp.add_argument("file", help="the compare_log file (JSON lines)")
    rp.add_argument("--json", action="store_true", help="the summary as JSON")
    rp.add_argument("--html", metavar="OUT", help="also write one self-contained HTML page")
    rp.add_argument("--ignore", action="append", metavar="RULE", type=noise_rule,
                    help="judge the contents again with this noise rule (a header name, or "
                    "re:EXPRESSION) instead of those the log was written with; repeatable")
    dr = sub.add_parser("doctor", help="check this host's set-up; prints the fix of each "
                        "problem (exit 0: all checks passed)")
    dr.add_argument("--client", default="", metavar="ADDR[,ADDR]",
                    help="client address(es) whose copies the target must answer through "
                    "interceptd (on the target host: checks the return route and rp_filter)")
    dr.add_argument("role", choices=("tcpcopyd", "interceptd"),
                    help="which daemon's host this is")
    dr.add_argument("args", nargs=argparse.REMAINDER,
                    help="the daemon's own flags, or --config FILE [-i IFACE]")
    gp = sub.add_parser("release-guard", help="remove the DROP rules interceptd leaves on "
                        "the target host so that no reply escapes while it is stopped (after "
                        "this, with interceptd stopped, the target's replies reach the "
                        "addresses they are sent to)")
    gp.add_argument("instance", nargs="?", default="interceptd",
                    help="the interceptd instance (default: interceptd)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "doctor":
        from tcpcopyd.ctl import doctor
        clients = [c.strip() for c in args.client.split(",") if c.strip()]
        return doctor.run(args.role, args.args, clients)
    if args.command == "metrics":
        return show_metrics(args)
    if args.command == "report":
        return show_report(args)
    if args.command == "release-guard":
        return release_guard(args)
    return status(args)


if __name__ == "__main__":
    sys.exit(main())
