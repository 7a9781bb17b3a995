"""interceptd's memory budget: every bound at its most against the unit's MemoryMax (the
README's arithmetic), queues that cannot fit refused with exit 78."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from interceptd import budget, shared
from interceptd.options import Settings
from tcpcopyd.service.settings import EX_CONFIG, ConfigError

ROOT = Path(__file__).resolve().parents[2]


def unit_memory_max() -> int:
    text = (ROOT / "etc/systemd/interceptd.service").read_text()
    value, unit = re.search(r"^MemoryMax=(\d+)([KMG])$", text, re.M).groups()
    return int(value) << {"K": 10, "M": 20, "G": 30}[unit]


def settings(cpus: int, **given) -> Settings:
    cfg = Settings()
    cfg.queues = cpus
    for k, v in given.items():
        setattr(cfg, k, v)
        cfg.source[k] = "/etc/interceptd.conf [interceptd]"
    return cfg


def test_the_shipped_unit_holds_the_workers_the_readme_says_at_the_defaults():
    cfg = Settings()
    assert cfg.queues == 1                           # the default: one queue, one worker
    budget.fit(cfg, lambda q: shared.extra_size(q, cfg.max_routes), unit_memory_max())
    cfg = settings(6, queues=6)
    budget.fit(cfg, lambda q: shared.extra_size(q, cfg.max_routes), unit_memory_max())
    with pytest.raises(ConfigError):
        cfg = settings(7, queues=7)
        budget.fit(cfg, lambda q: shared.extra_size(q, cfg.max_routes), unit_memory_max())
    readme = " ".join((ROOT / "README.md").read_text().split())   # lines rewrap
    assert "holds six workers at these bounds" in readme
    per_worker = sum(budget.per_worker(cfg).values()) >> 20
    assert f"≈ {per_worker} MiB per worker" in readme


def test_queues_the_operator_named_that_cannot_fit_are_refused():
    cfg = settings(8, queues=8)
    with pytest.raises(ConfigError) as e:
        budget.fit(cfg, lambda q: shared.extra_size(q, cfg.max_routes), unit_memory_max())
    assert e.value.code == EX_CONFIG
    assert str(e.value).startswith("/etc/interceptd.conf: [interceptd] queues = 8: 8 workers x "
                                   "158 MiB at most each")
    assert "at most 6 fit; lower queues or max_routes, or raise MemoryMax" in str(e.value)
    cfg = settings(8, queues=8, max_routes=16384)    # smaller tables: they fit
    budget.fit(cfg, lambda q: shared.extra_size(q, cfg.max_routes), unit_memory_max())
    assert cfg.queues == 8


def test_without_a_limit_nothing_changes():
    cfg = settings(64)
    budget.fit(cfg, lambda q: 0, None)
    assert cfg.queues == 64


def test_the_limit_is_the_smallest_memory_max_on_the_way_up(tmp_path, monkeypatch):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/interceptd.service\n")
    monkeypatch.setattr(budget, "CGROUP_ROOT", str(tmp_path / "fs"))
    assert budget.memory_limit(str(proc)) is None
    unit = tmp_path / "fs/system.slice/interceptd.service"
    unit.mkdir(parents=True)
    (unit / "memory.max").write_text("max\n")
    assert budget.memory_limit(str(proc)) is None
    (unit / "memory.max").write_text(f"{1 << 30}\n")
    (tmp_path / "fs/system.slice/memory.max").write_text(f"{512 << 20}\n")
    assert budget.memory_limit(str(proc)) == 512 << 20
    proc.write_text("12:memory:/legacy\n")           # cgroup v1 only: no limit read
    assert budget.memory_limit(str(proc)) is None
