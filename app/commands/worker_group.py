"""`imagegate worker --processes N`: several worker processes on one host, started and stopped as one.

A Python process runs its Python on one core at a time (the GIL), so a host's cores are used by one
worker process per core, each with its own `--concurrency` slots. The parent does no work: it starts
the children (the same command with `--processes 1`), passes SIGTERM and SIGINT on as SIGTERM (each
child's bounded warm shutdown; a second SIGINT would make Celery's shutdown cold), and exits once all
have. When a child exits on its own, the others are stopped too and the parent exits with the child's
code, so the host's supervisor (systemd, Kubernetes, compose) restarts the whole group, as it would a
single worker. The children share the parent's process group, so a SIGKILL to the group ends them all.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Callable

log = logging.getLogger(__name__)


def run_group(commands: list[list[str]], reaped: Callable[[int], None] = lambda pid: None) -> int:
    """Run each command as a child until all have exited; the exit code for the group. `reaped(pid)`
    is called as each one ends."""
    children: dict[int, subprocess.Popen] = {}
    stopping = False
    exit_code = 0

    def stop(*_) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        for command in commands:
            child = subprocess.Popen(command)
            children[child.pid] = child
        if stopping:  # a signal arrived while starting them: the last ones have not been told yet
            stop()
        while children:
            pid, status = os.wait()
            child = children.pop(pid, None)
            if child is None:
                continue
            child.returncode = code = os.waitstatus_to_exitcode(status)
            reaped(pid)
            if not stopping:
                log.warning("worker process %s exited with %s; stopping the others", pid, code)
                exit_code = code or 1
                stop()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return exit_code
