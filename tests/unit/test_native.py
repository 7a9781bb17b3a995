"""The two builds of the per-packet path: compiled (mypyc, the default where it is built) and
pure Python (TCPCOPYD_PURE=1). Both must send exactly the same packets for the same input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tcpcopyd import native

ROOT = Path(__file__).resolve().parents[2]


def run_build(pure: bool, *code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    if pure:
        env[native.PURE_ENV] = "1"
    return subprocess.run([sys.executable, *code], env=env, cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=600).stdout


def extensions(name: str) -> list[Path]:
    source = native.source(name, ROOT)
    return sorted(source.parent.glob(source.stem + ".*.so"))


def built() -> bool:
    return any(extensions(name) for name in native.COMPILED)


def test_every_compiled_module_keeps_its_source():
    for name in native.COMPILED:
        assert native.source(name, ROOT).is_file(), name


def test_the_pure_build_loads_every_module_from_its_source():
    files = json.loads(run_build(True, "-c", (
        "import json, importlib; from tcpcopyd import native; "
        "print(json.dumps({n: importlib.import_module(n).__file__ for n in native.COMPILED}))")))
    assert all(f.endswith(".py") for f in files.values()), files


@pytest.mark.skipif(not built(), reason="this tree has no compiled modules (no mypyc)")
def test_a_built_tree_runs_every_module_compiled_and_none_is_older_than_its_source():
    assert run_build(False, "-c", "from tcpcopyd import native; print(native.build())"
                     ).strip() == "compiled"
    for name in native.COMPILED:
        [ext] = extensions(name)
        assert ext.stat().st_mtime >= native.source(name, ROOT).stat().st_mtime, (
            f"{ext.name} is older than its source: rebuild (tools/setup.sh does)")


@pytest.mark.skipif(not built(), reason="this tree has no compiled modules (no mypyc)")
@pytest.mark.parametrize("case", [
    ["-m", "tcpcopyd.lab.differential", "--sessions", "400", "--seed", "1"],
    ["-c", "import json; from tcpcopyd.lab.fuzz import fuzz_engine; r = fuzz_engine(30000, 11); "
           "print(json.dumps({k: r[k] for k in ('sent_digest', 'packets_sent', 'counters')}))"],
], ids=["sessions", "fuzz"])
def test_both_builds_send_the_same_packets(case):
    compiled, pure = (json.loads(run_build(p, *case)) for p in (False, True))
    assert compiled.pop("build", "compiled") == "compiled"
    assert pure.pop("build", "pure") == "pure"
    assert compiled["packets_sent"] > 1000
    assert compiled == pure
