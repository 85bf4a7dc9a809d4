"""The `imagegate` console script.

gevent must patch the standard library before anything else is imported, so this entry point
looks at the command line first and imports the commands afterwards.
"""

from __future__ import annotations

import os
import sys

DEFAULT_WORKER_POOL = "gevent"


def _option(argv: list[str], *names: str) -> str | None:
    for index, arg in enumerate(argv):
        for name in names:
            if arg.startswith(f"{name}="):
                return arg.split("=", 1)[1]
            if arg == name and index + 1 < len(argv):
                return argv[index + 1]
    return None


def _runs_a_gevent_worker(argv: list[str]) -> bool:
    """`imagegate worker` running Celery's gevent pool in this very process. Not the parent of a group
    of worker processes: it only waits for its children, which must not block a patched event loop."""
    if argv[:1] != ["worker"] or (_option(argv, "--pool", "-P") or DEFAULT_WORKER_POOL) != "gevent":
        return False
    from imagegate.app.os_limits import worker_processes

    # Settings are not loaded yet (their imports come after the patching): the variable is read here.
    option = _option(argv, "--processes")
    try:
        processes = worker_processes(
            None if option is None else int(option), int(os.environ.get("IMAGEGATE_WORKER_PROCESSES") or 0)
        )
    except ValueError:
        return False  # click or the settings say what is wrong with it
    return processes == 1


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if _runs_a_gevent_worker(argv):
        from gevent import monkey

        monkey.patch_all()
    from imagegate.app.commands import cli

    cli.main(args=argv, prog_name="imagegate")


if __name__ == "__main__":
    main()
