"""tcpcopyd: live TCP traffic replication, online-host side."""

# the release: pyproject.toml, the commands' --version and the man pages take it from here
# (debian/changelog names it too; a unit test keeps the two in step)
__version__ = "0.1.0"

# TCPCOPYD_PURE=1: run the per-packet path from its .py sources, not the compiled modules
from tcpcopyd import native as _native  # noqa: E402

_native.use_source_if_asked()
