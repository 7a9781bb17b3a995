"""The layers contract (pyproject.toml, checked by `lint-imports` in tools/test) places
every module of the three packages, so a new module cannot slip past it."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modules() -> list[str]:
    out = []
    for package in ("tcpcopyd", "interceptd", "shm"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] != "__init__":
                out.append(".".join(parts))
    return sorted(out)


def test_every_module_has_a_layer():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    [contract] = [c for c in config["contracts"] if c["name"] == "layers of both daemons"]
    placed = [name.strip() for layer in contract["layers"] for name in layer.split("|")]
    unplaced = [m for m in modules()
                if not any(m == p or m.startswith(p + ".") for p in placed)]
    assert not unplaced, f"add these modules to a layer in pyproject.toml: {unplaced}"
