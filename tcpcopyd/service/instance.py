"""One running daemon per instance name. The master takes an exclusive lock on
``NAME.lock`` in the runtime directory before it touches iptables or shared memory, and
holds it for its life (its workers inherit it): a second start under the same name fails
at once and changes nothing of the first — above all not its NFQUEUE rules, without which
the target's replies would reach real clients."""
from __future__ import annotations

import errno
import fcntl
import os

from shm import rundir
from tcpcopyd.service.settings import SettingError, instance_name


class InstanceError(RuntimeError):
    """The instance cannot be taken: a bad name, another daemon holds it, or an untrusted
    runtime directory."""


class InstanceLock:
    """The lock that makes a master the only one running under its instance name."""

    def __init__(self, name: str) -> None:
        try:
            self.name = instance_name(name)
        except SettingError as e:
            raise InstanceError(f"instance name {name!r}: {e}") from None
        self.fd = -1
        self.path = ""

    def acquire(self) -> InstanceLock:
        try:
            directory = rundir.ensure()
        except OSError as e:
            raise InstanceError(f"runtime directory: {e}") from None
        self.path = os.path.join(directory, f"{self.name}.lock")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644)
        except OSError as e:
            raise InstanceError(f"{self.path}: {e.strerror}") from None
        try:
            rundir.trusted(os.fstat(fd), self.path)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except rundir.UntrustedPath as e:
            os.close(fd)
            raise InstanceError(str(e)) from None
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise InstanceError(f"{self.path}: {e.strerror}") from None
            raise InstanceError(
                f"instance {self.name!r} is already running"
                + (f" (pid {holder})" if holder.isdigit() else "")
                + ": stop it first, or give this one another --instance") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        """Give the name up (the master at exit; the file stays, unlocked)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
