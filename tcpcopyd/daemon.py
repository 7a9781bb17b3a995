"""What the two daemons' masters share: start-up failure messages, the version, and the
reload (SIGHUP) that re-reads the settings and publishes the live ones to the workers
through the shm segment."""
from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from shm.segment import Segment
from tcpcopyd import logs
from tcpcopyd.settings import Config, ConfigError, Layout, Setting, live_changes, load

log = logging.getLogger("reload")


def fail(prog: str, message: str, code: int = 1) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return code


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("tcpcopyd")
    except PackageNotFoundError:
        return "dev"


def jsonable(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return dataclasses.asdict(v)
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    return v


def live_values(registry: Sequence[Setting], cfg: Config) -> dict[str, Any]:
    """The settings a reload may change, as the workers read them from shm."""
    return {s.name: jsonable(cfg.values[s.name]) for s in registry if s.live}


class Reloader:
    """Called by the arbiter on SIGHUP: loads the same command line and config file again;
    applies what may change live (the master's logging, then the workers', which poll the
    segment) and logs what needs a restart. A file that no longer parses changes nothing."""

    def __init__(self, prog: str, description: str, registry: Sequence[Setting],
                 layout: Layout, cfg: Config, seg: Segment,
                 not_live: Callable[[Config, Config], list[str]] | None = None) -> None:
        self.prog = prog
        self.description = description
        self.registry = registry
        self.layout = layout
        self.cfg = cfg
        self.seg = seg
        self.not_live = not_live

    def publish(self) -> None:
        self.seg.write_settings(live_values(self.registry, self.cfg))

    def __call__(self) -> None:
        try:
            new = load(self.prog, self.description, self.registry, self.cfg.argv, self.layout)
        except ConfigError as e:
            log.error("reload failed, the running settings stay: %s", e)
            return
        except SystemExit:
            log.error("reload failed, the running settings stay: bad command line")
            return
        live, restart = live_changes(self.registry, self.cfg, new)
        for name in self.not_live(self.cfg, new) if self.not_live else ():
            if live.pop(name, None) is not None:
                restart.append(name)
        if "log" in live or "log_level" in live:
            try:
                logs.setup(self.prog, new.log, new.log_level)
            except OSError as e:
                log.error("reload: cannot open log file %s: %s; logging stays as it was",
                          new.log, e.strerror)
                live.pop("log", None)
                live.pop("log_level", None)
        self.cfg.values.update(live)
        self.publish()
        applied = ", ".join(f"{k}={jsonable(v)}" for k, v in live.items()) or "nothing changed"
        log.info("reload: applied %s", applied)
        if restart:
            log.warning("reload: changed but needs a restart to apply: %s", ", ".join(restart))


class StatusLine:
    """systemd's STATUS line: rates of some counters since the last call, gauges as they
    are, summed over the workers' shm records."""

    def __init__(self, seg: Segment, rates: Sequence[str], gauges: Sequence[str]) -> None:
        self.seg = seg
        self.rates = rates
        self.gauges = gauges
        self.last: tuple[float, dict[str, int]] | None = None

    def __call__(self) -> str:
        import time

        from tcpcopyd.ctl import totals
        now, cur = time.monotonic(), totals(self.seg)
        parts = []
        if self.last is not None and now > self.last[0]:
            dt = now - self.last[0]
            parts += [f"{name} {(cur.get(name, 0) - self.last[1].get(name, 0)) / dt:.0f}/s"
                      for name in self.rates]
        parts += [f"{name} {cur.get(name, 0)}" for name in self.gauges]
        self.last = (now, cur)
        return ", ".join(parts)


class SettingsWatch:
    """A worker's view of the live settings the master publishes: ``poll()`` gives the new
    ones once after each reload (and has already applied the logging part)."""

    def __init__(self, prog: str, seg: Segment, cfg: Config) -> None:
        self.prog = prog
        self.seg = seg
        self.cfg = cfg
        self.version = seg.settings_version()

    def poll(self) -> dict[str, Any] | None:
        from shm.seqlock import TornRead
        v = self.seg.settings_version()
        if v == self.version or v & 1:
            return None
        try:
            values = self.seg.read_settings()
        except TornRead:
            return None
        self.version = v
        if (values.get("log"), values.get("log_level")) != (self.cfg.log, self.cfg.log_level):
            try:
                logs.setup(self.prog, values.get("log"), values.get("log_level", "info"))
            except OSError:
                pass  # the master checked the file; keep the old logging if it failed here
        self.cfg.values.update(values)
        return values
