"""What a check of `tcpcopyctl doctor` says (OK, FAIL with its fix, or SKIP), and the
host facts the checks read."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Check:
    """The outcome of one check of `tcpcopyctl doctor`, and how to fix it if it failed."""
    name: str
    status: str          # OK, FAIL or SKIP
    detail: str
    fix: str = ""


def ok(name: str, detail: str) -> Check:
    return Check(name, "OK", detail)


def fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, "FAIL", detail, fix)


def sysctl(path: str) -> str | None:
    try:
        with open(f"/proc/sys/{path}") as f:
            return f.read().strip()
    except OSError:
        return None
