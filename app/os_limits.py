"""Process limits a server raises for itself at start."""

from __future__ import annotations

import resource


def allow_open_files(needed: int) -> None:
    """Raise the soft limit on open files towards the hard one: each connection is a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
