"""The `imagegate` console script.

gevent must patch the standard library before anything else is imported, so this entry point
looks at the command line first and imports the commands afterwards.
"""

from __future__ import annotations

import sys

DEFAULT_WORKER_POOL = "gevent"


def _worker_pool(argv: list[str]) -> str:
    for index, arg in enumerate(argv):
        if arg.startswith("--pool="):
            return arg.split("=", 1)[1]
        if arg in ("--pool", "-P") and index + 1 < len(argv):
            return argv[index + 1]
    return DEFAULT_WORKER_POOL


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"] and _worker_pool(argv) == "gevent":
        from gevent import monkey

        monkey.patch_all()
    from imagegate.app.commands import cli

    cli.main(args=argv, prog_name="imagegate")


if __name__ == "__main__":
    main()
