"""`imagegate up`: the API, a worker and a sweeper on one machine with no servers (an SQLite file
and a filesystem broker under the data directory), supervised by one foreground process.

It says "up" only once the API answers and the worker is consuming, keeps every file under the
data directory (the helpers' logs in logs/, unless --verbose shows them), and ends, with the last
lines of its log, when one of its processes dies.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import subprocess
import time
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from imagegate.app.heartbeats import recent
from imagegate.app.keys import authenticate, create_key, revoke_key

KEY_NAME = "embedded"  # the one live key `up` manages
READY_TIMEOUT_S = 120.0
POLL_S = 0.25
TAIL_LINES = 20


class UpError(Exception):
    """`up` cannot go on; the message says why (and what to do)."""


@dataclass
class Helper:
    name: str
    process: subprocess.Popen
    log: Path | None  # None with --verbose: its output went to the terminal

    def last_lines(self) -> str:
        if self.log is None:
            return "(its output is above)"
        with self.log.open(errors="replace") as handle:
            return "".join(deque(handle, maxlen=TAIL_LINES)).rstrip()

    def died(self) -> UpError:
        return UpError(
            f"imagegate {self.name} stopped (exit status {self.process.returncode}); "
            f"its last lines:\n{self.last_lines()}"
        )


def check_port(host: str, port: int) -> None:
    """Refuse a port something already listens on, before anything is started or printed. Bound as
    gunicorn binds (SO_REUSEADDR), so the closing connections of a previous run do not count."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UpError(f"port {port} on {host} is already in use: choose another with --port") from None
            raise UpError(f"cannot listen on {host} port {port}: {exc.strerror} (see --host and --port)") from None


def public_url(host: str, port: int) -> str:
    """The URL a client can reach: a wildcard host (0.0.0.0, ::) becomes this machine's address."""
    if host in ("0.0.0.0", "::", ""):
        host = machine_address()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def machine_address() -> str:
    """This machine's address on its default route (a UDP connect sends nothing), else its name's."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 80))  # a documentation address: only the routing table is read
            return probe.getsockname()[0]
    except OSError:
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, never readable by others even for a moment."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def secret_key(data_dir: Path) -> str:
    path = data_dir / "secret_key"
    if not path.exists():
        write_private(path, secrets.token_urlsafe(48))
    return path.read_text().strip()


def api_key(sessions: sessionmaker[Session], data_dir: Path, new: bool) -> tuple[str, bool]:
    """The key of the last run if it still works (and no new one was asked for), else a new one.
    Keys are stored hashed, so the plain key is kept in the data directory (mode 0600) for the
    next run to print: the price of a key that survives restarts in the embedded mode."""
    path = data_dir / "api_key"
    if not new and path.exists():
        kept = path.read_text().strip()
        if authenticate(sessions, kept) is not None:
            return kept, True
    revoke_key(sessions, KEY_NAME)  # the one before, whose plain text is being replaced
    key = create_key(sessions, KEY_NAME).key
    write_private(path, key + "\n")
    return key, False


def start_helpers(command: list[str], host: str, port: int, data_dir: Path, verbose: bool) -> list[Helper]:
    logs = data_dir / "logs"
    logs.mkdir(exist_ok=True)
    roles = {
        "api": ["api", "--host", host, "--port", str(port), "--workers", "1", "--connections", "1000"],
        "worker": ["worker", "--concurrency", "8", "--processes", "1"],  # one small machine: one process
        "sweeper": ["sweeper"],
    }
    helpers = []
    for name, args in roles.items():
        log = None if verbose else logs / f"{name}.log"
        output = None if log is None else log.open("w")
        process = subprocess.Popen(command + args, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        helpers.append(Helper(name, process, log))
    return helpers


def _api_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


def _worker_ready(engine: Engine, pid: int) -> bool:
    # The worker writes its first heartbeat when Celery says it is ready to consume.
    return any(seen.pid == pid for seen in recent(engine, kind="worker"))


def wait_until_ready(helpers: list[Helper], local_url: str, engine: Engine) -> None:
    by_name = {helper.name: helper for helper in helpers}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        dead = first_dead(helpers)
        if dead is not None:
            raise dead.died()
        if _api_answers(local_url) and _worker_ready(engine, by_name["worker"].process.pid):
            return
        time.sleep(POLL_S)
    waiting = "; ".join(f"{helper.name}:\n{helper.last_lines()}" for helper in helpers)
    raise UpError(f"not ready after {READY_TIMEOUT_S:.0f} s; the last lines of each process: {waiting}")


def first_dead(helpers: list[Helper]) -> Helper | None:
    return next((helper for helper in helpers if helper.process.poll() is not None), None)


def watch(helpers: list[Helper]) -> None:
    """Return never, or raise UpError when a helper dies."""
    while True:
        dead = first_dead(helpers)
        if dead is not None:
            raise dead.died()
        time.sleep(POLL_S)


def stop(helpers: list[Helper]) -> None:
    for helper in helpers:
        if helper.process.poll() is None:
            helper.process.terminate()
    for helper in helpers:
        try:
            helper.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            helper.process.kill()
            helper.process.wait()
