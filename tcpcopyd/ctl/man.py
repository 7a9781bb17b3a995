"""The man pages, written in roff from the settings registries and tcpcopyctl's command line
(``tcpcopyd.ctl.docs`` writes them to debian/man/; a unit test keeps them in step):
tcpcopyd(8), interceptd(8), tcpcopyctl(8), tcpcopyd.conf(5), interceptd.conf(5)."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from tcpcopyd.ctl import cli as ctl
from tcpcopyd.service.settings import Setting, toml_value, version

Section = tuple[str, str]   # (heading, roff body)


def esc(text: str) -> str:
    """Plain text as roff: backslashes and minus signs escaped, no line starting with a
    control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-").replace("%%", "%")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line
                     for line in text.split("\n"))


def bold(text: str) -> str:
    return f"\\fB{esc(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{esc(text)}\\fR"


def items(pairs: Sequence[tuple[str, str]]) -> str:
    """A tagged list: (tag in roff, paragraph in plain text)."""
    return "\n".join(f".TP\n{tag}\n{esc(text)}" for tag, text in pairs)


def page(name: str, section: int, summary: str, sections: Sequence[Section]) -> str:
    head = "System Administration" if section == 8 else "File Formats"
    out = [f'.TH {esc(name.upper())} {section} "" "tcpcopyd {version()}" "{head}"',
           ".SH NAME", f"{esc(name)} \\- {esc(summary)}"]
    for heading, body in sections:
        out += [f".SH {heading}", body.strip("\n")]
    return "\n".join(out) + "\n"


def paragraphs(*texts: str) -> str:
    return "\n.PP\n".join(esc(" ".join(t.split())) for t in texts)


def sentence(text: str) -> str:
    """A help string as a sentence: capital first, full stop last."""
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _notes(s: Setting) -> str:
    notes = ["Required." if s.required else f"Default: {s.shown_default()}."]
    if s.live:
        notes.append("A reload (SIGHUP) applies a new value.")
    return " ".join(notes)


def option_items(registry: Sequence[Setting]) -> str:
    pairs = [(f"{bold('--config')} {italic('FILE')}",
              "Read the settings from this TOML file; flags on the command line override "
              "it."),
             (bold("--version"), "Print the release and exit."),
             (f"{bold('-h')}, {bold('--help')}", "Print a summary of the options and exit.")]
    for s in registry:
        tag = ", ".join(bold(f) for f in s.flags) + ("" if s.is_flag else
                                                     f" {italic(s.metavar or 'VALUE')}")
        pairs.append((tag, f"{sentence(s.help)} {_notes(s)} Config key: {s.name}."))
    return items(pairs)


def key_items(registry: Sequence[Setting]) -> str:
    return items([(f"{bold(s.name)} = {italic(toml_value(s.example))}",
                   f"{sentence(s.help)} {_notes(s)} Flag: {s.flags[0]}.") for s in registry])


EXIT_DAEMON = items([
    (bold("0"), "Stopped on request (SIGTERM or SIGINT)."),
    (bold("1"), "A failure at start (the reason is on stderr or in the journal) or a worker "
                "in a crash loop (5 deaths within 10 s)."),
    (bold("2"), "A bad command line."),
    (bold("78"), "A bad configuration file, or a missing capture interface (EX_CONFIG): "
                 "the message names the file, the key and the reason; nothing was started. "
                 "The units do not restart after it."),
])
SIGNALS = items([
    (bold("SIGHUP"), "Read the configuration file again and apply the keys a reload may "
                     "change; the log says which changed keys need a restart."),
    (f"{bold('SIGTERM')}, {bold('SIGINT')}", "Stop the workers and leave cleanly."),
])


def tcpcopyd_8(registry: Sequence[Setting]) -> str:
    return page("tcpcopyd", 8, "copy live TCP traffic to a test server (online-host daemon)", [
        ("SYNOPSIS", f"{bold('tcpcopyd')} [{bold('--config')} {italic('FILE')}] "
                     f"{bold('-x')} {italic('RULES')} {bold('-s')} {italic('ADDR')} "
                     f"{bold('-i')} {italic('IFACE')} [{italic('OPTIONS')}]"),
        ("DESCRIPTION", paragraphs(
            "tcpcopyd captures the packets that clients send to a production (online) "
            "server on an interface and sends each session, rewritten, to a test (target) "
            "server, which answers as if the clients were its own. interceptd(8), on the "
            "target's host, takes the target's replies away from the clients and returns "
            "their headers to tcpcopyd over its control port, so that tcpcopyd can complete "
            "handshakes, pace requests, retransmit and end every session with a reset.",
            "A master process forks one worker per usable CPU, each pinned to it and reading "
            "its own AF_PACKET socket of one PACKET_FANOUT group; the sessions live in a "
            "shared memory table, so a worker that dies is replaced without losing them. "
            "The production server is never touched: tcpcopyd only reads copies of its "
            "packets.",
            "systemctl start tcpcopyd@eth0 runs one instance on eth0 with the settings of "
            "/etc/tcpcopyd.conf (see tcpcopyd.conf(5)); tcpcopyctl(8) shows its state.")),
        ("OPTIONS", option_items(registry)),
        ("SIGNALS", SIGNALS),
        ("EXIT STATUS", EXIT_DAEMON),
        ("FILES", items([
            (bold("/etc/tcpcopyd.conf"), "The settings (tcpcopyd.conf(5))."),
            (bold("/run/tcpcopyd/"), "The instance lock and shared memory segment that "
                                     "tcpcopyctl reads."),
            (bold("/var/log/tcpcopyd/"), "Log files, where the log setting names one."),
        ])),
        ("EXAMPLES", f".nf\n{esc('tcpcopyd -x 80-198.18.2.2:80 -s 198.18.2.2 -i eth0')}\n"
                     f"{esc('systemctl start tcpcopyd@eth0')}\n.fi"),
        ("SEE ALSO", "tcpcopyd.conf(5), interceptd(8), tcpcopyctl(8), systemctl(1)"),
    ])


def interceptd_8(registry: Sequence[Setting]) -> str:
    return page("interceptd", 8, "hand the test server's replies back to tcpcopyd "
                "(target-host daemon)", [
        ("SYNOPSIS", f"{bold('interceptd')} [{bold('--config')} {italic('FILE')}] "
                     f"{bold('--service-port')} {italic('PORTS')} [{italic('OPTIONS')}]"),
        ("DESCRIPTION", paragraphs(
            "interceptd runs on the host of the server under test. iptables rules send the "
            "target's replies from its service ports to NFQUEUE queues, one per worker "
            "process; every reply is dropped there (it must never reach a real client), and "
            "its TCP/IP headers go back over the control port to the tcpcopyd that "
            "registered the session. Without NFQUEUE (assistant mode, -i) it reads the "
            "replies from an interface of a host on their way instead.",
            "The control port admits only the addresses of allow (loopback by default); "
            "with a secret_file both sides prove they share it. Every limit is counted "
            "(tcpcopyctl status).",
            "systemctl start interceptd runs it with the settings of /etc/interceptd.conf "
            "(see interceptd.conf(5)).")),
        ("OPTIONS", option_items(registry)),
        ("SIGNALS", SIGNALS),
        ("EXIT STATUS", EXIT_DAEMON),
        ("FILES", items([
            (bold("/etc/interceptd.conf"), "The settings (interceptd.conf(5))."),
            (bold("/run/tcpcopyd/"), "The instance lock and shared memory segment."),
            (bold("/var/log/interceptd/"), "Log files, where the log setting names one."),
        ])),
        ("SEE ALSO", "interceptd.conf(5), tcpcopyd(8), tcpcopyctl(8), iptables(8)"),
    ])


def _conf_page(name: str, daemon: str, layout: str, registry: Sequence[Setting],
               example: str) -> str:
    return page(name, 5, f"settings of {daemon}(8)", [
        ("DESCRIPTION", paragraphs(
            f"/etc/{name} is a TOML file. {layout} Flags on the command line override it.",
            f"A file that cannot be used stops {daemon} before it starts anything: it "
            "prints the file, the table and key and the reason, and exits 78. A reload "
            "(systemctl reload) applies the keys marked so; a file that no longer parses "
            "changes nothing.",
            "Every key, its flag and its default:")),
        ("KEYS", key_items(registry)),
        ("EXAMPLE", f".nf\n{esc(example)}\n.fi"),
        ("SEE ALSO", f"{daemon}(8), tcpcopyctl(8)"),
    ])


def tcpcopyd_conf_5(registry: Sequence[Setting]) -> str:
    return _conf_page(
        "tcpcopyd.conf", "tcpcopyd",
        "tcpcopyd reads the table [default], then the table named after its capture "
        "interface ([eth0]), whose keys override it; a table [interceptd] is interceptd's.",
        registry,
        '[default]\nserver = "198.18.2.2"\n\n[eth0]\ntransfer = "80-198.18.2.2:80"')


def interceptd_conf_5(registry: Sequence[Setting]) -> str:
    return _conf_page(
        "interceptd.conf", "interceptd",
        "interceptd reads the table [interceptd] (the same table may also sit in "
        "/etc/tcpcopyd.conf on a host that runs both).",
        registry,
        '[interceptd]\nservice_port = [80]\nallow = ["198.18.1.0/24"]')


def _commands(ap: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    return [(name, p, helps.get(name, "")) for name, p in sub.choices.items()]


def _arguments(p: argparse.ArgumentParser) -> list[tuple[str, str]]:
    out = []
    for a in p._actions:
        if isinstance(a, argparse._HelpAction) or not a.help:
            continue
        if a.option_strings:
            tag = ", ".join(bold(o) for o in a.option_strings)
            if a.nargs != 0:
                tag += f" {italic(a.metavar or a.dest.upper())}"
        else:
            tag = italic(a.metavar or a.dest)
        out.append((tag, sentence(a.help)))
    return out


EXIT_CTL = items([
    (bold("0"), "status: every daemon is healthy. doctor: every check passed."),
    (bold("1"), "status: a daemon is degraded (a worker stale or restarting, an interceptd "
                "link down, drops rising). doctor: a check failed."),
    (bold("2"), "A bad command line."),
    (bold("3"), "status: a daemon is down (its master gone, no worker running, or no "
                "interceptd reachable), or none (of that name) is running."),
    (bold("4"), "status, metrics: the daemons' segments may not be read by this user (run "
                "as root, or as a member of the group tcpcopyd)."),
])


def tcpcopyctl_8(ap: argparse.ArgumentParser) -> str:
    sections: list[Section] = [
        ("SYNOPSIS", "\n.br\n".join(f"{bold('tcpcopyctl')} {bold(name)} "
                                     f"[{italic('OPTIONS')}]"
                                     for name, _, _ in _commands(ap))),
        ("DESCRIPTION", paragraphs(
            "tcpcopyctl shows the state of the tcpcopyd(8) and interceptd(8) daemons of "
            "this host, read from their shared memory segments in /run/tcpcopyd, and checks "
            "a host's set-up. Members of the group tcpcopyd may run it without root.")),
        ("COMMANDS", "\n".join(
            f".SS {name}\n{esc(sentence(' '.join(help.split())))}\n{items(_arguments(p))}"
            for name, p, help in _commands(ap))),
        ("EXIT STATUS", EXIT_CTL),
        ("SEE ALSO", "tcpcopyd(8), interceptd(8)"),
    ]
    return page("tcpcopyctl", 8, "state and checks of tcpcopyd and interceptd", sections)


def pages(tcpcopyd: Sequence[Setting], interceptd: Sequence[Setting]) -> dict[str, str]:
    """File name -> roff text of every man page."""
    return {
        "tcpcopyd.8": tcpcopyd_8(tcpcopyd),
        "interceptd.8": interceptd_8(interceptd),
        "tcpcopyctl.8": tcpcopyctl_8(ctl.parser()),
        "tcpcopyd.conf.5": tcpcopyd_conf_5(tcpcopyd),
        "interceptd.conf.5": interceptd_conf_5(interceptd),
    }
