"""The layers contracts (pyproject.toml, checked by `lint-imports` in tools/test) place
every module of the three packages, so a new module cannot slip past them: the product's
contract places every package, and each package of more than one module has a contract of
its own that is exhaustive (lint-imports fails on a module it leaves out)."""
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
    [product] = [c for c in config["contracts"] if c["name"].startswith("layers of the product")]
    placed = [name.strip() for layer in product["layers"] for name in layer.split("|")]
    unplaced = [m for m in modules()
                if not any(m == p or m.startswith(p + ".") for p in placed)]
    assert not unplaced, f"add these modules to a layer in pyproject.toml: {unplaced}"
    # the product's contract places the modules directly under the root packages
    covered = {c for contract in config["contracts"] if contract.get("exhaustive")
               for c in contract["containers"]} | set(config["root_packages"])
    packages = {m.rsplit(".", 1)[0] for m in modules()}
    uncovered = sorted(p for p in packages
                       if sum(m.startswith(p + ".") for m in modules()) > 1 and p not in covered)
    assert not uncovered, f"give these packages an exhaustive layers contract: {uncovered}"
