"""Linux capabilities: which this process holds (root without them, as in a restricted
systemd unit or a container, cannot capture or install rules), and giving up all but a few
once a worker has opened what needs them (its sockets stay usable: the kernel checks most
capabilities when a socket is made, not when it is used)."""
from __future__ import annotations

import ctypes
import errno
import os

BITS = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_NICE": 23}
# linux/capability.h, linux/prctl.h
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_PDEATHSIG = 1
# the highest capability number a kernel may know (it says EINVAL past its own)
CAP_LAST = 63


class _Header(ctypes.Structure):
    """struct __user_cap_header_struct (linux/capability.h)."""
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    """struct __user_cap_data_struct (linux/capability.h)."""
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def effective(status_path: str = "/proc/self/status") -> int:
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def missing(names: tuple[str, ...]) -> list[str]:
    """The capabilities of ``names`` that the effective set lacks."""
    caps = effective()
    return [n for n in names if not caps >> BITS[n] & 1]


def names_of(mask: int) -> list[str]:
    return [name for name, bit in BITS.items() if mask >> bit & 1] + \
        [f"cap_{bit}" for bit in range(CAP_LAST + 1)
         if mask >> bit & 1 and bit not in BITS.values()]


def keep_only(names: tuple[str, ...]) -> None:
    """Give up every capability but ``names``: the bounding, ambient, inheritable,
    permitted and effective sets (for good: nothing can take them back). Raises OSError."""
    keep = 0
    for name in names:
        keep |= 1 << BITS[name]
    for bit in range(CAP_LAST + 1):
        if not keep >> bit & 1 and _libc.prctl(PR_CAPBSET_DROP, bit, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL:        # past the last capability this kernel knows
                break
            if err != errno.EPERM:         # EPERM: no CAP_SETPCAP (an unprivileged run)
                raise OSError(err, f"PR_CAPBSET_DROP {bit}: {os.strerror(err)}")
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    data[0].effective = data[0].permitted = keep & 0xFFFFFFFF
    data[1].effective = data[1].permitted = keep >> 32
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def die_with_parent(signal_number: int) -> None:
    """Have the kernel send ``signal_number`` to this process when its parent dies."""
    if _libc.prctl(PR_SET_PDEATHSIG, signal_number, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"PR_SET_PDEATHSIG: {os.strerror(err)}")
