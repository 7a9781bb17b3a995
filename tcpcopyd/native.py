"""The compiled per-packet path: which modules mypyc compiles, and the way back to their source.

Each module below is built into a C extension beside its ``.py`` (``setup.py``; the ``.py``
stays the one reference). Python finds an extension before a source file of the same name, so
a built tree runs compiled. ``TCPCOPYD_PURE=1`` in the environment makes the process load the
``.py`` sources instead (the pure-Python build: same behaviour, slower), and a tree built
without mypyc has no extensions at all.

Nothing here imports the product: the package's ``__init__`` installs the switch before any
compiled module can be imported.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PURE_ENV = "TCPCOPYD_PURE"
# the group name mypyc gives the one shared library that holds the compiled code
GROUP = "tcpcopyd_native"
# the compiler, pinned: the build requirement in pyproject.toml names the same version
MYPY_VERSION = "2.4.1"

# per packet, in order of the layers (what a captured packet and a reply go through)
COMPILED = (
    "tcpcopyd.net.packet",
    "tcpcopyd.net.wire",
    "tcpcopyd.online.counters",
    "tcpcopyd.online.reorder",
    "tcpcopyd.online.timers",
    "tcpcopyd.online.session",
    "tcpcopyd.online.rewrite",
    "tcpcopyd.online.targets",
    "tcpcopyd.online.portreuse",
    "tcpcopyd.online.copies",
    "tcpcopyd.online.engine.state",
    "tcpcopyd.online.engine.output",
    "tcpcopyd.online.engine.closing",
    "tcpcopyd.online.engine.stream",
    "tcpcopyd.online.engine.transmit",
    "tcpcopyd.online.engine.replies",
    "tcpcopyd.online.engine.admission",
    "tcpcopyd.online.engine.persist",
    "tcpcopyd.online.engine.core",
    "tcpcopyd.online.mirror",
    "tcpcopyd.net.ring",
    "tcpcopyd.net.reader",
    "tcpcopyd.net.sender",
    "tcpcopyd.online.control",
    "tcpcopyd.online.loop",
    # interceptd: a reply from its queue to its record and its route
    "interceptd.nfqueue",
    "interceptd.replies",
    "interceptd.router",
    "interceptd.control",
    "interceptd.loop",
)


def source(name: str, root: Path) -> Path:
    """The ``.py`` file of a module under the tree ``root`` (the folder above the package)."""
    return root.joinpath(*name.split(".")).with_suffix(".py")


class SourceFirst(importlib.abc.MetaPathFinder):
    """Finds the compiled modules' ``.py`` sources, never their extensions."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED or not path:
            return None
        leaf = fullname.rpartition(".")[2]
        for folder in path:
            finder = importlib.machinery.FileFinder(
                folder, (importlib.machinery.SourceFileLoader,
                         importlib.machinery.SOURCE_SUFFIXES))
            spec = finder.find_spec(fullname)
            if spec is not None and Path(folder, leaf + ".py").exists():
                return spec
        return None


def use_source_if_asked() -> None:
    """With ``TCPCOPYD_PURE`` set (to anything but 0 or empty), load the sources."""
    if os.environ.get(PURE_ENV, "") not in ("", "0") and not any(
            isinstance(f, SourceFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, SourceFirst())


def loaded() -> dict[str, bool]:
    """For each compiled module already imported: whether it runs compiled."""
    return {name: not str(getattr(sys.modules[name], "__file__", "")).endswith(".py")
            for name in COMPILED if name in sys.modules}


def build() -> str:
    """One word for --version and the logs: ``compiled``, ``pure`` or ``mixed`` (it imports
    the per-packet path, by name: this module sits under the layers it names)."""
    for name in COMPILED:
        importlib.import_module(name)
    states = set(loaded().values())
    return "mixed" if len(states) > 1 else "compiled" if states == {True} else "pure"
