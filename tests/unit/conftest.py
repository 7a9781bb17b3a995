"""Fixtures the unit tests of the engine share."""
from __future__ import annotations

import pytest


@pytest.fixture
def slot_table():
    """A real shm session table of 16 slots (one worker), removed afterwards."""
    import os

    from shm import segment as shmseg
    from shm.table import SlotTable
    from tcpcopyd.online.session import SLOT, SLOT_SIZE
    seg = shmseg.create(f"tcpcopyd-test-slots-{os.getpid()}", 1, 1, 16, SLOT_SIZE)
    yield SlotTable(seg, SLOT)
    seg.close()
    seg.unlink()
