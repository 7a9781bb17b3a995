"""The most memory interceptd can hold, from its bounds, against the memory limit of its
cgroup (the unit's ``MemoryMax``): at start, queues that cannot fit are refused (exit 78),
so that no load, flood or slow peer can get the service killed by the kernel for memory.

Per worker: the interpreter and its modules, its routes (``max_routes``), the replies
waiting for their registration (``router.DELAY_MAX``) and the early look-ups of their
sessions (``router.SOON_MAX``), the unsent replies of all its
peers (``router.WORKER_MAX_PENDING``), the comparison test's memory of answers
(``replies.ANSWERS_SEEN_MAX``) and what each connection may hold untagged
(``wire.UNTAGGED_UP_MAX`` x ``max_connections``). Once: the master and the shm segment.
The sizes of one entry were measured (BENCHMARKS.md, "interceptd's memory").
"""
from __future__ import annotations

from collections.abc import Callable

from interceptd import replies, router
from interceptd.options import Settings
from tcpcopyd.net import wire

MIB = 1 << 20
# a worker's interpreter, modules and buffers before it holds anything; the master's
INTERPRETER = 40 * MIB
MASTER = 40 * MIB
# bytes one entry costs (Python's dict entry, its key and value, the shm key-table slot)
ROUTE_BYTES = 400
DELAYED_BYTES = 170
# an entry of the heap of early look-ups (router.RETRY_SOON): a tuple, its float, the heap's slot
RETRY_SOON_BYTES = 100
ANSWER_SEEN_BYTES = 150
CGROUP_ROOT = "/sys/fs/cgroup"


def per_worker(cfg: Settings) -> dict[str, int]:
    """Each bound of one worker, in bytes."""
    return {"interpreter": INTERPRETER,
            "routes (max_routes)": cfg.max_routes * ROUTE_BYTES,
            "replies waiting for their registration": router.DELAY_MAX * DELAYED_BYTES,
            "their early look-ups": router.SOON_MAX * RETRY_SOON_BYTES,
            "unsent replies": router.WORKER_MAX_PENDING,
            "answers seen (comparison test)": replies.ANSWERS_SEEN_MAX * ANSWER_SEEN_BYTES,
            "untagged messages (max_connections)": cfg.max_connections * wire.UNTAGGED_UP_MAX}


def worst_case(cfg: Settings, queues: int, segment: int) -> int:
    """All of interceptd with ``queues`` workers and a segment of ``segment`` bytes."""
    return queues * sum(per_worker(cfg).values()) + MASTER + segment


def memory_limit(proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """The memory.max of our cgroup (v2) and of those above it, the smallest; None if there
    is none (no limit, or no cgroup v2)."""
    try:
        with open(proc_cgroup) as f:
            path = next((line.split("::", 1)[1].strip() for line in f
                         if line.startswith("0::")), None)
    except OSError:
        return None
    if path is None:
        return None
    limits = []
    parts = [p for p in path.split("/") if p]
    for i in range(len(parts), 0, -1):
        try:
            with open("/".join([CGROUP_ROOT, *parts[:i], "memory.max"])) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    return min(limits) if limits else None


def fit(cfg: Settings, segment: Callable[[int], int], limit: int | None) -> None:
    """Refuse queues that do not fit ``limit`` (ConfigError, exit 78), the shm segment for
    ``q`` queues being ``segment(q)`` bytes."""
    if limit is None or worst_case(cfg, cfg.queues, segment(cfg.queues)) <= limit:
        return
    fits = next((q for q in range(cfg.queues - 1, 0, -1)
                 if worst_case(cfg, q, segment(q)) <= limit), 0)
    one = sum(per_worker(cfg).values())
    whole = worst_case(cfg, cfg.queues, segment(cfg.queues))
    arithmetic = (f"{cfg.queues} workers x {one // MIB} MiB at most each (max_routes "
                  f"{cfg.max_routes}, max_connections {cfg.max_connections}) + "
                  f"{(whole - cfg.queues * one) // MIB} MiB = {whole // MIB} MiB, above this "
                  f"service's memory limit of {limit // MIB} MiB")
    raise cfg.invalid("queues" if fits >= 1 else "max_routes",
                      f"{arithmetic}: at most {fits} fit; lower queues or max_routes, "
                      f"or raise MemoryMax (systemctl edit interceptd)")
