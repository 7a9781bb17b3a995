"""One registry of settings: each declared once with its CLI flag (tcpcopy's letter where it
has one), config-file key, default, parser and help. Used by both daemons.

Errors: a bad command-line value exits 2 (usage); a bad config file exits 78 (EX_CONFIG),
naming the file, the key and the reason. Nothing is started before all of it is valid.
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

EX_USAGE = 2
EX_CONFIG = 78


class SettingError(ValueError):
    """A value that does not parse; the message says what was expected."""


@dataclass(frozen=True)
class Setting:
    name: str                       # attribute and config key
    flags: tuple[str, ...]          # CLI flags, e.g. ("-x", "--transfer")
    default: Any
    parse: Callable[[Any], Any]     # raw value (CLI string or TOML value) -> value
    help: str
    metavar: str | None = None
    required: bool = False
    is_flag: bool = False           # a boolean switch without an argument


@dataclass
class Config:
    values: dict[str, Any] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)  # name -> "cli" / file path

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


def die(prog: str, message: str, code: int) -> NoReturn:
    print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(code)


def parse_args(prog: str, description: str, registry: Sequence[Setting],
               argv: Sequence[str] | None, config_section: str) -> Config:
    """Parse the command line (and ``--config FILE`` if given) into a validated Config."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--config", metavar="FILE", help="read settings from this TOML file "
                    f"(table [{config_section}]); command-line flags override it")
    for s in registry:
        kw: dict[str, Any] = {"dest": s.name, "help": s.help, "default": None}
        if s.is_flag:
            kw["action"] = "store_const"
            kw["const"] = True
        else:
            kw["metavar"] = s.metavar
        ap.add_argument(*s.flags, **kw)
    ns = ap.parse_args(argv)
    cfg = Config()
    if ns.config:
        load_file(prog, ns.config, config_section, registry, cfg)
    for s in registry:
        raw = getattr(ns, s.name)
        if raw is None:
            continue
        try:
            cfg.values[s.name] = s.parse(raw)
        except SettingError as e:
            die(prog, f"{s.flags[0]} {raw!r}: {e}", EX_USAGE)
        cfg.source[s.name] = "cli"
    for s in registry:
        if s.name not in cfg.values:
            if s.required:
                die(prog, f"{' / '.join(s.flags)} is required ({s.help})", EX_USAGE)
            cfg.values[s.name] = s.default
    return cfg


def load_file(prog: str, path: str, section: str, registry: Sequence[Setting],
              cfg: Config) -> None:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        die(prog, f"{path}: no such file", EX_CONFIG)
    except OSError as e:
        die(prog, f"{path}: {e.strerror}", EX_CONFIG)
    except tomllib.TOMLDecodeError as e:
        die(prog, f"{path}: {e}", EX_CONFIG)
    table = data.get(section, {})
    if not isinstance(table, dict):
        die(prog, f"{path}: [{section}] must be a table", EX_CONFIG)
    by_name = {s.name: s for s in registry}
    for key, raw in table.items():
        s = by_name.get(key)
        if s is None:
            die(prog, f"{path}: [{section}] {key}: unknown key", EX_CONFIG)
        try:
            cfg.values[key] = s.parse(raw)
        except SettingError as e:
            die(prog, f"{path}: [{section}] {key} = {raw!r}: {e}", EX_CONFIG)
        cfg.source[key] = path


# ---------------------------------------------------------------- value parsers
def int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(raw: Any) -> int:
        try:
            v = int(raw)
        except (TypeError, ValueError):
            raise SettingError(f"expected an integer from {lo} to {hi}") from None
        if isinstance(raw, bool) or not lo <= v <= hi:
            raise SettingError(f"expected an integer from {lo} to {hi}")
        return v
    return parse


def float_range(lo: float, hi: float) -> Callable[[Any], float]:
    def parse(raw: Any) -> float:
        try:
            v = float(raw)
        except (TypeError, ValueError):
            raise SettingError(f"expected a number from {lo} to {hi}") from None
        if isinstance(raw, bool) or not lo <= v <= hi:
            raise SettingError(f"expected a number from {lo} to {hi}")
        return v
    return parse


def text(raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise SettingError("expected a non-empty string")
    return raw


def boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    raise SettingError("expected true or false")


def ipv4(raw: str) -> str:
    import socket
    try:
        socket.inet_aton(raw)
    except OSError:
        raise SettingError(f"{raw!r} is not an IPv4 address") from None
    if raw.count(".") != 3:
        raise SettingError(f"{raw!r} is not a dotted IPv4 address")
    return raw


def port(raw: str) -> int:
    return int_range(1, 65535)(raw)


def port_list(raw: Any) -> list[int]:
    """'80,11211' or a TOML list of ints."""
    items = raw if isinstance(raw, list) else str(raw).split(",")
    out = []
    for item in items:
        try:
            out.append(port(str(item).strip()))
        except SettingError:
            raise SettingError(f"{item!r} is not a port (1-65535); expected e.g. 80,11211") \
                from None
    if not out:
        raise SettingError("expected at least one port")
    return out


def choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        if raw not in options:
            raise SettingError(f"expected one of {', '.join(options)}")
        return str(raw)
    return parse


# settings both daemons have
COMMON = (
    Setting("log", ("-l", "--log"), None, text, "log to this file instead of stderr",
            metavar="FILE"),
    Setting("log_level", ("--log-level",), "info",
            choice(("debug", "info", "warning", "error")), "debug, info, warning or error",
            metavar="LEVEL"),
    Setting("pidfile", ("-P", "--pidfile"), None, text, "write the master's pid here",
            metavar="FILE"),
)
