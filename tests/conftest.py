"""Shared fixtures. Lab tests need root and create their own namespaces."""
from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="lab tests need root (network namespaces, NFQUEUE)")
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(skip)
