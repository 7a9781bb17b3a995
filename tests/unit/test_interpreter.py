"""The interpreter the tests and the lab run on: the one the Debian package runs the daemons
on (Debian 12's /usr/bin/python3, built with profile-guided and link-time optimisation),
which tools/setup.sh makes .venv from unless $PYTHON chooses another. A plain source build
of the same Python version costs the daemons 10-20 % more (BENCHMARKS.md), so the figures
and the timings of the lab would not be the product's."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

SYSTEM = "/usr/bin/python3"


def system_is_311() -> bool:
    if not os.path.exists(SYSTEM):
        return False
    r = subprocess.run([SYSTEM, "-c", "import sys; print(sys.version_info[:2] == (3, 11))"],
                       capture_output=True, text=True, timeout=60)
    return r.stdout.strip() == "True"


@pytest.mark.skipif(bool(os.environ.get("PYTHON")), reason="$PYTHON chose the interpreter")
@pytest.mark.skipif(not system_is_311(), reason=f"no Python 3.11 at {SYSTEM}")
def test_the_tests_run_on_the_interpreter_the_package_runs_on():
    assert os.path.realpath(sys._base_executable) == os.path.realpath(SYSTEM)
