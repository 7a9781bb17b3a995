"""Shared fixtures. Lab tests need root and create their own namespaces."""
from __future__ import annotations

import os
import tempfile

import pytest

if os.geteuid() != 0:
    # the daemons' runtime directory (/run/tcpcopyd) is root's: unit tests run elsewhere
    os.environ.setdefault("TCPCOPYD_RUNTIME_DIR", tempfile.mkdtemp(prefix="tcpcopyd-run-"))


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="lab tests need root (network namespaces, NFQUEUE)")
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(skip)
