"""What the bench starts: its own Postgres cluster and redis-server, and supervised processes.

Everything started is registered in a `Stack` and stopped by `Stack.close()` (also on Ctrl-C)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _postgres_binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found[-1]:
        raise SystemExit(f"bench: {name} not found (apt-get install postgresql)")
    return found[-1]


class Proc:
    """A process the bench started, with its log file and psutil handle."""

    def __init__(self, name: str, command: list[str], log: Path, env: dict | None = None, cwd: str | None = None):
        self.name, self.command, self.log_path = name, command, log
        self._log = open(log, "ab")
        self.popen = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        self.ps = psutil.Process(self.popen.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[psutil.Process]:
        try:
            return [self.ps] + self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def cpu_s(self) -> float:
        """CPU seconds of the tree, including children already reaped."""
        return tree_cpu_s(self.ps)

    def rss(self) -> int:
        total = 0
        for process in self.tree():
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 20) -> None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(timeout=10)
        if not self._log.closed:
            self._log.close()


def tree_cpu_s(root: psutil.Process) -> float:
    total = 0.0
    try:
        processes = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    for index, process in enumerate(processes):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
        if index == 0:
            total += times.children_user + times.children_system
    return total


class Postgres:
    """A throwaway cluster under `directory`, run as the `postgres` user when we are root."""

    def __init__(self, directory: Path, max_connections: int = 500):
        self.directory = directory / "pg"
        self.directory.mkdir()
        self.run_as: list[str] = []
        if os.geteuid() == 0:  # Postgres refuses to run as root
            shutil.chown(directory, "postgres")
            shutil.chown(self.directory, "postgres")
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.data = self.directory / "data"
        self.pg_ctl = _postgres_binary("pg_ctl")
        subprocess.run(
            self.run_as
            + [_postgres_binary("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
            f"-c max_connections={max_connections} -c shared_buffers=256MB -c fsync=off "
            f"-c synchronous_commit=off -c full_page_writes=off"
        )
        subprocess.run(
            self.run_as
            + [self.pg_ctl, "-D", str(self.data), "-l", str(self.directory / "log"), "-w", "-o", options, "start"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.postmaster = psutil.Process(int((self.data / "postmaster.pid").read_text().split()[0]))

    def url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres", "postgresql"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def cpu_s(self) -> float:
        return tree_cpu_s(self.postmaster)

    def stop(self) -> None:
        subprocess.run(
            self.run_as + [self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )


class Redis:
    def __init__(self, directory: Path):
        self.port = free_port()
        binary = shutil.which("redis-server")
        if not binary:
            raise SystemExit("bench: redis-server not found (apt-get install redis-server)")
        self.proc = Proc(
            "redis",
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxclients",
                "10000",
            ],
            directory / "redis.log",
        )
        wait_until(lambda: port_open(self.port), 20, "redis-server")

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0):
        import redis

        return redis.Redis(port=self.port, db=db)


class Stack:
    """Owns the temp dir and everything started; close() stops it all, newest first."""

    def __init__(self, keep: bool = False):
        self.directory = Path(tempfile.mkdtemp(prefix="imagegate-bench-"))
        os.chmod(self.directory, 0o755)
        self.keep = keep
        self._procs: list[Proc] = []
        self._started = 0
        self.postgres: Postgres | None = None
        self.redis: Redis | None = None

    def start(self, name: str, command: list[str], env: dict | None = None, cwd: str | None = None) -> Proc:
        self._started += 1
        proc = Proc(name, command, self.directory / f"{self._started:02d}-{name}.log", env=env, cwd=cwd)
        self._procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self._procs):
            try:
                proc.stop(timeout_s=10)
            except Exception:  # noqa: BLE001 - cleanup goes on whatever one process did
                pass
        self._procs.clear()
        if self.redis is not None:
            self.redis.proc.stop()
        if self.postgres is not None:
            self.postgres.stop()
        if not self.keep:
            shutil.rmtree(self.directory, ignore_errors=True)
