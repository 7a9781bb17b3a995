"""Builds the compiled per-packet path (tcpcopyd/native.py lists the modules) with mypyc.

Everything else about the package is in pyproject.toml. Without the pinned mypy (for
example a Debian build without it), without a C compiler or Python's headers, or with
TCPCOPYD_PURE=1, the package is pure Python (the same behaviour, slower), and says why.
"""
import importlib.util
import os
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def native():
    spec = importlib.util.spec_from_file_location("_native", ROOT / "tcpcopyd" / "native.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compiled_modules():
    n = native()
    if os.environ.get(n.PURE_ENV, "") not in ("", "0"):
        print(f"{n.PURE_ENV} is set: building the pure-Python package", file=sys.stderr)
        return []
    try:
        import mypy.version
        from mypyc.build import mypycify
    except ImportError:
        print("mypyc is not installed: building the pure-Python package", file=sys.stderr)
        return []
    if mypy.version.__version__ != n.MYPY_VERSION:
        print(f"mypy {mypy.version.__version__} is not the pinned {n.MYPY_VERSION}: "
              "building the pure-Python package", file=sys.stderr)
        return []
    compiler = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")[0]
    if shutil.which(compiler) is None:
        print(f"no C compiler ({compiler}): building the pure-Python package", file=sys.stderr)
        return []
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        print("no Python.h (python3-dev): building the pure-Python package", file=sys.stderr)
        return []
    paths = [str(n.source(name, Path("."))) for name in n.COMPILED]
    return mypycify(paths + ["--follow-imports=silent", "--ignore-missing-imports"],
                    opt_level="3", group_name=n.GROUP)


setup(ext_modules=compiled_modules())
