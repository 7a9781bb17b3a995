"""interceptd: target-host side of tcpcopyd (catches and routes the target's replies)."""

# TCPCOPYD_PURE=1: run the per-reply path from its .py sources, not the compiled modules
from tcpcopyd import native as _native  # noqa: E402

_native.use_source_if_asked()
