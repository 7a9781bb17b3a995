"""The runtime directory: where the daemons keep their shared-memory segments and instance
locks (``/run/tcpcopyd``, a tmpfs on every systemd host; ``TCPCOPYD_RUNTIME_DIR``
elsewhere). It must belong to us and be writable by nobody else, so no other local user
can plant a segment or a lock that stops a daemon from starting or fools tcpcopyctl: the
daemons create it that way and refuse one that is not; readers check each file too.
"""
from __future__ import annotations

import grp
import os
import stat

RUNTIME_DIR = os.environ.get("TCPCOPYD_RUNTIME_DIR", "/run/tcpcopyd")
# members of this group may read the segments (tcpcopyctl status without root)
READERS_GROUP = "tcpcopyd"


class UntrustedPath(OSError):
    """A runtime directory or file that another user could have made or changed."""


def ensure() -> str:
    """The runtime directory, made (0755) if missing; raises UntrustedPath if it is a
    symbolic link, not a directory, not ours, or writable by group or others."""
    try:
        os.mkdir(RUNTIME_DIR, 0o755)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(RUNTIME_DIR, 0o755, exist_ok=True)
    check(RUNTIME_DIR, directory=True)
    return RUNTIME_DIR


def check(path: str, directory: bool = False) -> os.stat_result:
    """lstat ``path`` and refuse it (UntrustedPath) unless ``trusted``."""
    st = os.lstat(path)
    trusted(st, path, directory)
    return st


def trusted(st: os.stat_result, path: str, directory: bool = False) -> None:
    """Refuse anything but a plain file (or a directory) owned by root or by us and
    writable by nobody else."""
    kind = stat.S_ISDIR if directory else stat.S_ISREG
    if not kind(st.st_mode):
        raise UntrustedPath(f"{path}: not a {'directory' if directory else 'plain file'}"
                            + (" (a symbolic link)" if stat.S_ISLNK(st.st_mode) else ""))
    if st.st_uid not in (0, os.geteuid()):
        raise UntrustedPath(f"{path}: belongs to uid {st.st_uid}, not to root or to us")
    if st.st_mode & 0o022:
        raise UntrustedPath(f"{path}: writable by group or others (mode "
                            f"{stat.S_IMODE(st.st_mode):04o})")


def share_with_readers(fd: int) -> str | None:
    """Make a new segment readable by the group READERS_GROUP, if the group exists and we
    may give the file to it (root, or a member of the group); else it stays ours only, and
    the answer says why (None: shared, or no such group)."""
    try:
        gid = grp.getgrnam(READERS_GROUP).gr_gid
    except KeyError:
        return None
    try:
        os.fchown(fd, -1, gid)
        os.fchmod(fd, 0o640)
    except PermissionError as e:
        return (f"cannot give it to the group {READERS_GROUP} ({e.strerror}): only root "
                "may read its status")
    return None
