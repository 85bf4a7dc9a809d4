"""Real Postgres and Redis for the tests: the machine's own when reachable, else throwaway
instances started from installed binaries, else a message that says what is missing."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")


def _find(binary: str) -> str | None:
    found = shutil.which(binary)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{binary}"))
    return candidates[-1] if candidates else None


class MissingService(RuntimeError):
    pass


@dataclass
class Throwaway:
    """A server started for this run alone; stop() removes it and its data."""

    url: str
    process: subprocess.Popen | None = None
    directory: Path | None = None
    stop_command: list[str] = field(default_factory=list)
    start_command: list[str] = field(default_factory=list)
    run_as: list[str] = field(default_factory=list)

    def pause(self) -> None:
        """Stop the server, keeping its data, to start it again with resume()."""
        if self.process is not None:  # redis-server keeps nothing: a restart is an empty server
            self.process.kill()
            self.process.wait()
        else:
            subprocess.run(self.run_as + self.stop_command, check=True, capture_output=True, timeout=60)

    def resume(self) -> None:
        if self.process is not None:
            self.process = subprocess.Popen(self.start_command, stdout=subprocess.DEVNULL)
            port = int(self.url.rsplit(":", 1)[1])
            wait_until(lambda: reachable("127.0.0.1", port), 20, "redis-server to restart")
        else:
            subprocess.run(self.run_as + self.start_command, check=True, capture_output=True, timeout=120)

    def stop(self) -> None:
        if self.stop_command:
            subprocess.run(self.run_as + self.stop_command, capture_output=True, timeout=60)
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def start_postgres() -> Throwaway:
    initdb, pg_ctl = _find("initdb"), _find("pg_ctl")
    if not (initdb and pg_ctl):
        raise MissingService(
            "Postgres is not reachable at 127.0.0.1:5432 and initdb/pg_ctl are not installed "
            "(apt-get install postgresql)"
        )
    directory = Path(tempfile.mkdtemp(prefix="imagegate-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # Postgres refuses to run as root
        shutil.chown(directory, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = directory / "data"
    subprocess.run(
        run_as + [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    start = [
        pg_ctl,
        "-D",
        str(data),
        "-l",
        str(directory / "log"),
        "-w",
        "-o",
        f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off",
        "start",
    ]
    subprocess.run(run_as + start, check=True, capture_output=True, timeout=120)
    return Throwaway(
        f"postgresql+psycopg://postgres@127.0.0.1:{port}",
        directory=directory,
        stop_command=[pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"],
        start_command=start,
        run_as=run_as,
    )


def start_redis() -> Throwaway:
    binary = shutil.which("redis-server")
    if not binary:
        raise MissingService(
            "Redis is not reachable at 127.0.0.1:6379 and redis-server is not installed (apt-get install redis-server)"
        )
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    wait_until(lambda: reachable("127.0.0.1", port), 20, "throwaway redis-server")
    return Throwaway(f"redis://127.0.0.1:{port}", process=process, start_command=command)
