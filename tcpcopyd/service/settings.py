"""One registry of settings per daemon: each setting declared once, as a typed field of the
daemon's ``Config`` dataclass, with its CLI flag (tcpcopy's letter where it has one),
config-file key, default, parser, help, an example and whether a reload (SIGHUP) may change
it. Used by both daemons, by the README's option tables and by the shipped config files
(``tcpcopyd.ctl.docs`` writes both from the registry).

Config files are TOML. tcpcopyd reads the ``[default]`` table and then the table named after
its capture interface (``[eth0]``), which overrides it; interceptd reads the ``[interceptd]``
table. Flags on the command line override the file.

Errors: a bad command-line value exits 2 (usage); a bad config file exits 78 (EX_CONFIG)
with one line naming the file, the table and key and the reason. Nothing is started before
all of it is valid.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import stat
import sys
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

EX_USAGE = 2
EX_CONFIG = 78
# key of a setting's declaration in its dataclass field's metadata
SETTING = "setting"


class SettingError(ValueError):
    """A value that does not parse; the message says what was expected."""


class ConfigError(Exception):
    """A command line or config file that cannot be used; ``code`` is the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _same(v: Any) -> Any:
    return v


@dataclass(frozen=True)
class Setting:
    """One setting: its flag, key, default, parser, help, and whether a reload may change it."""
    name: str                       # attribute and config key
    flags: tuple[str, ...]          # CLI flags, e.g. ("-x", "--transfer")
    default: Any
    parse: Callable[[Any], Any]     # raw value (CLI string or TOML value) -> value
    help: str
    metavar: str | None = None
    required: bool = False
    is_flag: bool = False           # a boolean switch without an argument
    example: Any = None             # a TOML value for the shipped config and the tests
    live: bool = False              # a reload (SIGHUP) applies a new value
    default_text: str | None = None  # how the docs show the default, where not repr-able
    # value -> a TOML/JSON value that ``parse`` turns back into it (shm, status, logs)
    show: Callable[[Any], Any] = _same

    def shown_default(self) -> str:
        """The default as the docs show it ("required", "on", "64 MiB", ...)."""
        if self.required:
            return "required"
        if self.default_text is not None:
            return self.default_text
        v = self.default
        if v is None:
            return "none"
        if isinstance(v, bool):
            return "on" if v else "off"
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        if isinstance(v, int) and v >= 1 << 20 and v % (1 << 20) == 0:
            return f"{v >> 20} MiB"
        return str(v)

    def encode(self, value: Any) -> Any:
        return None if value is None else self.show(value)

    def decode(self, raw: Any) -> Any:
        return None if raw is None else self.parse(raw)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def setting(flags: tuple[str, ...], default: Any, parse: Callable[[Any], Any], help: str,
            **kw: Any) -> Any:
    """Declares one setting as a field of a ``Config`` dataclass (its name is the field's);
    the keywords are those of ``Setting``."""
    return field(default=default,
                 metadata={SETTING: Setting("", flags, default, parse, help, **kw)})


@dataclass
class Config:
    """A daemon's settings: a dataclass whose fields are declared with ``setting()``, one
    typed attribute each, plus where each value came from. The types hold everywhere:
    after a reload too, in the master and in the workers."""
    source: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    argv: list[str] = field(default_factory=list, repr=False, compare=False)
    # the shared secret, read from secret_file at start (load_secret)
    secret: bytes | None = field(default=None, repr=False, compare=False)

    @classmethod
    def registry(cls) -> Registry:
        return Registry(cls)

    @property
    def values(self) -> dict[str, Any]:
        """Every setting's value by name (a copy: assign attributes to change one)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if SETTING in f.metadata}

    def update(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            setattr(self, name, value)

    def finish(self) -> None:
        """After loading: fill the defaults that depend on the host and check the settings
        against each other (raise ``self.invalid(...)``). A daemon's Config overrides it."""

    def invalid(self, name: str, reason: str) -> ConfigError:
        """The error for setting ``name``: where its value came from, the value, why (exit
        2 for a flag, 78 for the file or a default)."""
        s = self.registry().by_name[name]
        value = s.encode(getattr(self, name))
        where = self.source.get(name)
        if where == "cli":
            shown = ",".join(map(str, value)) if isinstance(value, list) else value
            return ConfigError(f"{s.flags[0]} {shown}: {reason}", EX_USAGE)
        if where and where.startswith("env "):
            return ConfigError(f"environment {where[4:]}={value!r}: {reason}", EX_CONFIG)
        if where:
            path, _, table = where.partition(" [")
            return ConfigError(f"{path}: [{table} {name} = {value!r}: {reason}", EX_CONFIG)
        return ConfigError(f"{name} = {value!r} (its default): {reason}", EX_CONFIG)


class Registry(Sequence[Setting]):
    """The settings of one ``Config`` class, in declaration order."""

    def __init__(self, config: type[Config]) -> None:
        self.config = config
        self.settings = tuple(dataclasses.replace(f.metadata[SETTING], name=f.name)
                              for f in dataclasses.fields(config) if SETTING in f.metadata)
        self.by_name = {s.name: s for s in self.settings}

    def __getitem__(self, i):  # type: ignore[override]
        return self.settings[i]

    def __len__(self) -> int:
        return len(self.settings)

    def __iter__(self) -> Iterator[Setting]:
        return iter(self.settings)


@dataclass(frozen=True)
class Layout:
    """Which tables of a config file a daemon reads.

    ``tables(cli, parsed)`` gives the tables to apply in order, given the command-line values
    and the file's parsed tables (tcpcopyd's interface comes from the command line or
    ``[default]``); ``checked(name)``
    says whether a table of the file belongs to this daemon (its keys are validated even
    when it is not applied, so a typo under ``[eth1]`` is found while eth0 starts)."""
    tables: Callable[[dict[str, Any], dict[str, dict[str, Any]]], list[str]]
    checked: Callable[[str], bool]
    describe: str
    # a positional form of the command line (tcpcopy's first one): its metavar, and a
    # function from its words to (values, as if flags gave them; values used where neither
    # a flag nor the file gives one); it raises SettingError
    positional: str | None = None
    from_words: Callable[[list[str]], tuple[dict[str, Any], dict[str, Any]]] | None = None


def version() -> str:
    """The release of this code."""
    from tcpcopyd import __version__
    return __version__


def die(prog: str, message: str, code: int) -> NoReturn:
    print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(code)


def parse_args(prog: str, description: str, registry: Registry,
               argv: Sequence[str] | None, layout: Layout) -> Any:
    """Parse the command line (and ``--config FILE`` if given) into a validated Config;
    exit 2 or 78 with one line on stderr if it cannot be used."""
    try:
        return load(prog, description, registry, argv, layout)
    except ConfigError as e:
        die(prog, str(e), e.code)


def load(prog: str, description: str, registry: Registry,
         argv: Sequence[str] | None, layout: Layout) -> Any:
    """A validated ``registry.config`` from the command line, ``--config FILE`` and the
    environment: the file's values, the environment's over them (``env_name``: a
    container's settings), then the flags over both, then what positional words say of
    the rest."""
    ap = _parser(prog, description, registry, layout)
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = ap.parse_intermixed_args(argv) if layout.positional else ap.parse_args(argv)
    cfg = registry.config(argv=argv)
    cli = _flags(ns, registry)
    fallback = _words(ns, registry, layout, cli)
    applied: list[str] = []
    if ns.config:
        applied = _apply_file(cfg, ns.config, registry, layout, cli)
    _apply_environment(cfg, prog, registry)
    for name, value in cli.items():
        setattr(cfg, name, value)
        cfg.source[name] = "cli"
    for name, value in fallback.items():
        if name not in cfg.source:
            setattr(cfg, name, value)
            cfg.source[name] = "cli"
    for s in registry:
        if s.required and s.name not in cfg.source:
            if ns.config:
                raise ConfigError(f"{ns.config}: {s.name} is not set (put it in "
                                  f"{' or '.join(f'[{t}]' for t in applied)} or give "
                                  f"{s.flags[0]}): {s.help}", EX_CONFIG)
            raise ConfigError(f"{' / '.join(s.flags)} is required ({s.help}; or the "
                              f"environment's {env_name(prog, s.name)})", EX_USAGE)
    cfg.finish()
    return cfg


def _parser(prog: str, description: str, registry: Registry,
            layout: Layout) -> argparse.ArgumentParser:
    """The command line: a flag per setting of the registry, --config, --version."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    release = f"{prog} {version()}"
    if prog == "tcpcopyd":      # it runs the per-packet path: its --version names the build
        from tcpcopyd import native
        release += f" (per-packet path: {native.build()})"
    ap.add_argument("--version", action="version", version=release)
    ap.add_argument("--config", metavar="FILE", help="read settings from this TOML file "
                    f"({layout.describe}); command-line flags override it")
    for s in registry:
        kw: dict[str, Any] = {"dest": s.name, "help": s.help, "default": None}
        if s.is_flag:
            kw["action"] = "store_const"
            kw["const"] = True
        else:
            kw["metavar"] = s.metavar
        ap.add_argument(*s.flags, **kw)
    if layout.positional:
        ap.add_argument("words", nargs="*", metavar=layout.positional,
                        help="the same as the flags they stand for (see the manual)")
    return ap


def _flags(ns: argparse.Namespace, registry: Registry) -> dict[str, Any]:
    """The settings the flags gave, parsed."""
    cli: dict[str, Any] = {}
    for s in registry:
        raw = getattr(ns, s.name)
        if raw is None:
            continue
        try:
            cli[s.name] = s.parse(raw)
        except SettingError as e:
            raise ConfigError(f"{s.flags[0]} {raw!r}: {e}", EX_USAGE) from None
    return cli


def _words(ns: argparse.Namespace, registry: Registry, layout: Layout,
           cli: dict[str, Any]) -> dict[str, Any]:
    """What the positional words say: the settings they give go into ``cli`` (a setting
    given by a flag too is an error); returns those they give only where nothing else
    does."""
    if not (getattr(ns, "words", None) and layout.from_words):
        return {}
    try:
        given, fallback = layout.from_words(ns.words)
    except SettingError as e:
        raise ConfigError(f"{' '.join(ns.words)}: {e}", EX_USAGE) from None
    for name, value in given.items():
        if name in cli:
            flag = registry.by_name[name].flags[0]
            raise ConfigError(f"{flag} and {' '.join(ns.words)} both say {name}: give one "
                              "of them", EX_USAGE)
        cli[name] = value
    return fallback


def _apply_file(cfg: Any, path: str, registry: Registry, layout: Layout,
                cli: dict[str, Any]) -> list[str]:
    """Set what the config file's tables for this daemon say; returns their names."""
    tables = check_file(path, read_file(path), registry, layout)
    applied = layout.tables(cli, tables)
    for name in applied:
        for key, value in tables.get(name, {}).items():
            setattr(cfg, key, value)
            cfg.source[key] = f"{path} [{name}]"
    return applied


def env_name(prog: str, name: str) -> str:
    """The environment variable of setting ``name`` of daemon ``prog`` (the last word:
    `tcpcopyctl doctor tcpcopyd` reads tcpcopyd's): TCPCOPYD_TRANSFER,
    INTERCEPTD_SERVICE_PORT."""
    return f"{prog.split()[-1].upper()}_{name.upper()}"


def _apply_environment(cfg: Any, prog: str, registry: Registry) -> None:
    """Set what the environment says, each value read as its flag's (a switch: true or
    false, 1 or 0); a bad one names its variable (exit 78)."""
    for s in registry:
        var = env_name(prog, s.name)
        raw = os.environ.get(var)
        if raw is None:
            continue
        try:
            if s.is_flag:
                word = raw.strip().lower()
                if word not in ("true", "false", "1", "0", "yes", "no"):
                    raise SettingError("expected true or false")
                raw = word in ("true", "1", "yes")
            setattr(cfg, s.name, s.parse(raw))
        except SettingError as e:
            raise ConfigError(f"environment {var}={raw!r}: {e}", EX_CONFIG) from None
        cfg.source[s.name] = f"env {var}"


def read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file", EX_CONFIG) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file", EX_CONFIG) from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}", EX_CONFIG) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}", EX_CONFIG) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text", EX_CONFIG) from None
    except ValueError as e:   # tomllib's int() of a number of over 4300 digits
        raise ConfigError(f"{path}: not a usable TOML file: {e}", EX_CONFIG) from None


def check_file(path: str, data: dict[str, Any], registry: Registry,
               layout: Layout) -> dict[str, dict[str, Any]]:
    """Every table of the file that belongs to this daemon, parsed and validated."""
    by_name = registry.by_name
    out: dict[str, dict[str, Any]] = {}
    for name, table in data.items():
        if not layout.checked(name):
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {name} = {table!r}: settings belong in a table "
                              f"({layout.describe})", EX_CONFIG)
        parsed = out[name] = {}
        for key, raw in table.items():
            s = by_name.get(key)
            if s is None:
                near = [k for k in by_name if k.replace("_", "") == key.replace("_", "")
                        .replace("-", "")]
                hint = f" (did you mean {near[0]}?)" if near else ""
                raise ConfigError(f"{path}: [{name}] {key}: unknown key{hint}", EX_CONFIG)
            if isinstance(raw, dict):
                raise ConfigError(f"{path}: [{name}] {key}: a table, expected a value",
                                  EX_CONFIG)
            try:
                parsed[key] = s.parse(raw)
            except SettingError as e:
                raise ConfigError(f"{path}: [{name}] {key} = {raw!r}: {e}", EX_CONFIG) \
                    from None
    return out


def live_changes(registry: Registry, old: Config, new: Config
                 ) -> tuple[dict[str, Any], list[str]]:
    """What a reload may apply (name -> new value) and what needs a restart (names)."""
    live, restart = {}, []
    for s in registry:
        a, b = getattr(old, s.name), getattr(new, s.name)
        if a == b:
            continue
        if s.live:
            live[s.name] = b
        else:
            restart.append(s.name)
    return live, restart


# ---------------------------------------------------------------- value parsers
def int_range(lo: int, hi: int) -> Callable[[Any], int]:
    """An integer: a TOML integer or decimal digits (no sign but -, no fraction, no
    exponent), from ``lo`` to ``hi``."""
    def parse(raw: Any) -> int:
        what = f"expected an integer from {lo} to {hi}"
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise SettingError(what + (f", not {raw!r}" if isinstance(raw, float) else ""))
        if isinstance(raw, str) and not re.fullmatch(r"-?[0-9]{1,20}", raw.strip()):
            raise SettingError(what)
        v = int(raw)
        if not lo <= v <= hi:
            raise SettingError(what)
        return v
    return parse


def float_range(lo: float, hi: float) -> Callable[[Any], float]:
    """A finite number from ``lo`` to ``hi`` (no inf, no nan)."""
    def parse(raw: Any) -> float:
        what = f"expected a number from {lo:g} to {hi:g}"
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise SettingError(what)
        try:
            v = float(raw)
        except (ValueError, OverflowError):
            raise SettingError(what) from None
        if not math.isfinite(v) or not lo <= v <= hi:
            raise SettingError(what)
        return v
    return parse


def text(raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise SettingError("expected a non-empty string")
    return raw


# instance names: used in file names (NAME.shm, NAME.lock) and in iptables comments
INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,62}")


def instance_name(raw: Any) -> str:
    if not isinstance(raw, str) or not INSTANCE_NAME.fullmatch(raw):
        raise SettingError("expected 1-63 letters, digits and . _ @ + - starting with a "
                           "letter or digit")
    return raw


# a shared secret's size, bytes (after surrounding white space is stripped)
SECRET_MIN = 16
SECRET_MAX = 4096


def read_secret(path: str) -> bytes:
    """The shared secret in ``path``: a plain file of root's (or ours) that no one else may
    read. Raises SettingError saying what is wrong and how to fix it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise SettingError(f"cannot read it: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SettingError("not a plain file")
        if st.st_uid not in (0, os.geteuid()):
            raise SettingError(f"belongs to uid {st.st_uid}: it must be root's")
        if st.st_mode & 0o077:
            raise SettingError(f"others may read it (mode {stat.S_IMODE(st.st_mode):04o}): "
                               f"chmod 600 {path}")
        data = f.read(SECRET_MAX + 1).strip()
    if not SECRET_MIN <= len(data) <= SECRET_MAX:
        raise SettingError(f"{len(data)} bytes: a secret has {SECRET_MIN} to {SECRET_MAX} "
                           f"bytes, e.g. head -c 32 /dev/urandom | base64 > {path}")
    return data


def load_secret(cfg: Config) -> None:
    """Read ``cfg.secret_file`` (at start: a reload does not change it) into ``cfg.secret``;
    raises ConfigError (exit 78) naming where the setting came from and what is wrong."""
    path = getattr(cfg, "secret_file", None)
    if path is None:
        return
    try:
        cfg.secret = read_secret(path)
    except SettingError as e:
        err = cfg.invalid("secret_file", str(e))
        err.code = EX_CONFIG                  # a file that is wrong, wherever it was named
        raise err from None


def boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    raise SettingError("expected true or false")


def port(raw: str) -> int:
    return int_range(1, 65535)(raw)


def list_items(raw: Any) -> list:
    """The items of a value given as 'a,b' on the command line or as a TOML list."""
    return raw if isinstance(raw, list) else str(raw).split(",")


def port_list(raw: Any) -> list[int]:
    """'80,11211' or a TOML list of ints."""
    items = list_items(raw)
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


# settings both daemons have: each daemon's Config declares them where its docs list them
def log_setting(example: str) -> Any:
    return setting(("-l", "--log"), None, text,
                   "log to this file instead of stderr/journald (created 0640); SIGUSR1 "
                   "reopens it (log rotation)", metavar="FILE", example=example, live=True,
                   default_text="stderr")


def log_level_setting() -> Any:
    return setting(("--log-level",), "info", choice(("debug", "info", "warning", "error")),
                   "debug, info, warning or error", metavar="LEVEL", example="info", live=True)


def secret_file_setting() -> Any:
    return setting(("--secret-file",), None, text,
                   "file holding the shared secret of tcpcopyd and interceptd (at least 16 "
                   "bytes, mode 0600): both sides then prove it (HMAC-SHA256 "
                   "challenge-response both ways), refuse a peer that cannot, and tag every "
                   "frame; never on the command line itself", metavar="FILE",
                   example="/etc/tcpcopyd/secret",
                   default_text="none")


def pidfile_setting(example: str) -> Any:
    return setting(("-P", "--pidfile"), None, text,
                   "write the master's pid here (removed at exit); under systemd only "
                   "/run/tcpcopyd is writable", metavar="FILE", example=example)
