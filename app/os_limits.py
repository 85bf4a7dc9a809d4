"""What a server process may use of its machine: open files it raises for itself at start, the CPU
cores it may run on. Imports nothing heavy: the console script asks before gevent patches anything."""

from __future__ import annotations

import os
import resource


def worker_processes(option: int | None, setting: int) -> int:
    """The processes one `imagegate worker` runs: `--processes` if given, else
    IMAGEGATE_WORKER_PROCESSES; 0 means one per usable core."""
    return (setting if option is None else option) or usable_cores()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def allow_open_files(needed: int) -> None:
    """Raise the soft limit on open files towards the hard one: each connection is a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
