"""The network layer's set-up errors. They are OSErrors, which compiled modules cannot
subclass (tcpcopyd/native.py), so they live here, interpreted."""
from __future__ import annotations


class CaptureError(OSError):
    """The capture socket could not be set up."""


class SendError(OSError):
    """The raw socket could not be opened."""
