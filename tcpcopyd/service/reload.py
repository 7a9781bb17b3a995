"""The reload (SIGHUP): the master re-reads the settings and publishes the live ones to the
workers through the shm segment, each value in its ``Setting.show`` form, which the workers
parse back with the same registry (so a value has the same type in the master and in
every worker). Also systemd's STATUS line, built from the workers' counters."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from shm.segment import Segment, SegmentError, settings_blob
from shm.seqlock import TornRead
from tcpcopyd.service import logs
from tcpcopyd.service.settings import (
    Config,
    ConfigError,
    Layout,
    Registry,
    SettingError,
    live_changes,
    load,
)

log = logging.getLogger("reload")


def live_values(registry: Registry, cfg: Config) -> dict[str, Any]:
    """The settings a reload may change, as the workers read them from shm."""
    return {s.name: s.encode(getattr(cfg, s.name)) for s in registry if s.live}


class Reloader:
    """Called by the arbiter on SIGHUP: loads the same command line and config file again;
    applies what may change live (the master's logging, then the workers', which poll the
    segment) and logs what needs a restart. A file that no longer parses changes nothing."""

    def __init__(self, prog: str, description: str, registry: Registry,
                 layout: Layout, cfg: Config, seg: Segment,
                 not_live: Callable[[Any, Any], list[str]] | None = None) -> None:
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
        """Never raises: a reload that cannot be applied is logged and changes nothing."""
        try:
            self._reload()
        except ConfigError as e:
            log.error("reload failed, the running settings stay: %s", e)
        except SystemExit:
            log.error("reload failed, the running settings stay: bad command line")
        except Exception as e:  # noqa: BLE001 - the master must survive any reload
            log.exception("reload failed, the running settings stay: %s", e)

    def _reload(self) -> None:
        new = load(self.prog, self.description, self.registry, self.cfg.argv, self.layout)
        try:
            settings_blob(live_values(self.registry, new))
        except SegmentError as e:
            raise ConfigError(str(e), 78) from None
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
        self.cfg.update(live)
        self.publish()
        by_name = self.registry.by_name
        applied = ", ".join(f"{k}={by_name[k].encode(v)}" for k, v in live.items()) \
            or "nothing changed"
        log.info("reload: applied %s", applied)
        if restart:
            log.warning("reload: changed but needs a restart to apply: %s", ", ".join(restart))


class StatusLine:
    """systemd's STATUS line: rates of some counters since the last call, gauges as they
    are, summed over the workers' shm records."""

    def __init__(self, seg: Segment, names: tuple[str, ...], rates: Sequence[str],
                 gauges: Sequence[str]) -> None:
        self.seg = seg
        self.names = names
        self.rates = rates
        self.gauges = gauges
        self.last: tuple[float, dict[str, int]] | None = None

    def __call__(self) -> str:
        now, cur = time.monotonic(), self.seg.totals(self.names)
        parts = []
        if self.last is not None and now > self.last[0]:
            dt = now - self.last[0]
            parts += [f"{name} {(cur[name] - self.last[1][name]) / dt:.0f}/s"
                      for name in self.rates]
        parts += [f"{name} {cur[name]}" for name in self.gauges]
        self.last = (now, cur)
        return ", ".join(parts)


class SettingsWatch:
    """A worker's view of the live settings the master publishes: ``poll()`` gives the new
    ones once after each reload, parsed back to their types and applied to ``cfg`` (the
    logging part too)."""

    def __init__(self, prog: str, seg: Segment, cfg: Config) -> None:
        self.prog = prog
        self.seg = seg
        self.cfg = cfg
        self.registry = cfg.registry()
        self.version = seg.settings_version()

    def poll(self) -> dict[str, Any] | None:
        v = self.seg.settings_version()
        if v == self.version or v & 1:
            return None
        try:
            published = self.seg.read_settings()
        except TornRead:
            return None
        self.version = v
        values = {}
        for name, raw in published.items():
            s = self.registry.by_name.get(name)
            try:
                if s is not None:
                    values[name] = s.decode(raw)
            except SettingError as e:
                log.error("published setting %s = %r not applied: %s", name, raw, e)
        log_now = (self.cfg.log, self.cfg.log_level)
        self.cfg.update(values)
        if (self.cfg.log, self.cfg.log_level) != log_now:
            try:
                logs.setup(self.prog, self.cfg.log, self.cfg.log_level)
            except OSError:
                pass  # the master checked the file; keep the old logging if it failed here
        return values
