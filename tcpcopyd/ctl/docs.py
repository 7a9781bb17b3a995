"""The README's option tables, the shipped config files and the man pages (debian/man/),
written from the settings registries so that they cannot drift from the code.

``python -m tcpcopyd.ctl.docs`` rewrites them; ``--check`` only says whether they are current
(a unit test runs it)."""
from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from tcpcopyd.ctl import man
from tcpcopyd.service.settings import Setting, toml_value

ROOT = Path(__file__).resolve().parents[2]


def _registries() -> tuple[Sequence[Setting], Sequence[Setting]]:
    from interceptd.options import REGISTRY as INTERCEPTD
    from tcpcopyd.online.options import REGISTRY as TCPCOPYD
    return TCPCOPYD, INTERCEPTD


def options_table(registry: Sequence[Setting]) -> str:
    rows = ["| flag | config key | default | reload | meaning |", "|---|---|---|---|---|"]
    for s in registry:
        flag = ", ".join(s.flags) + ("" if s.is_flag else f" {s.metavar}")
        text = s.help.replace("|", "/").replace("%%", "%")
        rows.append(f"| `{flag}` | `{s.name}` | {s.shown_default()} | "
                    f"{'live' if s.live else 'restart'} | {text} |")
    return "\n".join(rows) + "\n"


def _commented(registry: Sequence[Setting], with_help: bool) -> list[str]:
    out = []
    for s in registry:
        if with_help:
            notes = ["required" if s.required else f"default: {s.shown_default()}",
                     f"flag {s.flags[0]}"]
            if s.live:
                notes.append("a reload applies it")
            out += textwrap.wrap(f"{s.help.replace('%%', '%')} ({'; '.join(notes)})", 78,
                                 initial_indent="# ", subsequent_indent="# ")
        out.append(f"# {s.name} = {toml_value(s.example)}")
        if with_help:
            out.append("")
    return out


def tcpcopyd_conf(registry: Sequence[Setting]) -> str:
    lines = [
        "# /etc/tcpcopyd.conf: settings of tcpcopyd, the online-host daemon (TOML).",
        "#",
        "# `systemctl start tcpcopyd@eth0` runs",
        "#     tcpcopyd --config /etc/tcpcopyd.conf --interface eth0",
        "# which reads the table [default], then the table named after the interface",
        "# ([eth0] below), whose keys override it. Command-line flags override both.",
        "# `systemctl reload tcpcopyd@eth0` applies the keys marked so and logs which",
        "# changed keys need a restart. A bad file: tcpcopyd prints the file, the key and",
        "# the reason, exits 78 and starts nothing. Every key, with its default:",
        "",
        "[default]",
        *_commented(registry, True),
        "# One table per capture interface, e.g.:",
        "# [eth0]",
        *_commented([s for s in registry if s.name in ("transfer", "server", "sample_rate")],
                    False),
        "",
        "# interceptd's settings may live here too, in a table [interceptd]",
        "# (the interceptd package ships them in /etc/interceptd.conf).",
    ]
    return "\n".join(lines) + "\n"


def interceptd_conf(registry: Sequence[Setting]) -> str:
    lines = [
        "# /etc/interceptd.conf: settings of interceptd, the target-host daemon (TOML).",
        "#",
        "# `systemctl start interceptd` runs `interceptd --config /etc/interceptd.conf`,",
        "# which reads the table [interceptd] (the same table may also sit in",
        "# /etc/tcpcopyd.conf on a host that runs both). Command-line flags override it.",
        "# A bad file: interceptd prints the file, the key and the reason, exits 78 and",
        "# starts nothing.",
        "#",
        "# Security: by default the control port admits loopback only. Add the online",
        "# hosts to `allow`, and where the test network is shared give both hosts the",
        "# same `secret_file` (README, \"Security model\"). Every key, with its default:",
        "",
        "[interceptd]",
        *_commented(registry, True),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def readme(text: str, tcpcopyd: Sequence[Setting], interceptd: Sequence[Setting]) -> str:
    for name, registry in (("tcpcopyd", tcpcopyd), ("interceptd", interceptd)):
        begin = f"<!-- BEGIN options {name} (python -m tcpcopyd.ctl.docs) -->\n"
        end = f"<!-- END options {name} -->"
        i, j = text.index(begin) + len(begin), text.index(end)
        text = text[:i] + options_table(registry) + text[j:]
    return text


def generated() -> dict[Path, str]:
    tcpcopyd, interceptd = _registries()
    readme_path = ROOT / "README.md"
    return {
        readme_path: readme(readme_path.read_text(), tcpcopyd, interceptd),
        ROOT / "etc" / "tcpcopyd.conf": tcpcopyd_conf(tcpcopyd),
        ROOT / "etc" / "interceptd.conf": interceptd_conf(interceptd),
        **{ROOT / "debian" / "man" / name: text
           for name, text in man.pages(tcpcopyd, interceptd).items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tcpcopyd.ctl.docs", description=__doc__)
    ap.add_argument("--check", action="store_true", help="only report stale files")
    args = ap.parse_args(argv)
    stale = []
    for path, content in generated().items():
        current = path.read_text() if path.exists() else None
        if current != content:
            stale.append(path)
            if not args.check:
                path.parent.mkdir(exist_ok=True)
                path.write_text(content)
    for path in stale:
        print(f"{'stale' if args.check else 'rewrote'}: {path.relative_to(ROOT)}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
