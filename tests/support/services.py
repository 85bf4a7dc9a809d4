"""Real Postgres and Redis for the tests: the machine's own when reachable, else throwaway
instances started from installed binaries, else a message that says what is missing."""

from __future__ import annotations

import glob
import os
import shutil
import signal
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


def start_postgres(*settings: str) -> Throwaway:
    """A throwaway cluster; `settings` are more of its configuration ("autovacuum_naptime=1", ...)."""
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
        f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        + "".join(f" -c {setting}" for setting in settings),
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


def start_redis(*options: str) -> Throwaway:
    """A throwaway redis-server; `options` are more of its configuration ("--rename-command", ...)."""
    binary = shutil.which("redis-server")
    if not binary:
        raise MissingService(
            "Redis is not reachable at 127.0.0.1:6379 and redis-server is not installed (apt-get install redis-server)"
        )
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    wait_until(lambda: reachable("127.0.0.1", port), 20, "throwaway redis-server")
    return Throwaway(f"redis://127.0.0.1:{port}", process=process, start_command=command)


RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # Debian's: the /usr/sbin wrappers switch to the rabbitmq user


def _rabbitmq_user(environment: dict[str, str] | None = None) -> list[str]:
    """rabbitmq-server and rabbitmqctl run as the rabbitmq user (its Erlang cookie) when we are root."""
    variables = [f"{name}={value}" for name, value in (environment or {}).items()]
    if os.geteuid() == 0:
        return ["runuser", "-u", "rabbitmq", "--", "env", "HOME=/var/lib/rabbitmq", *variables]
    return ["env", *variables]


@dataclass
class RabbitMQ:
    """A RabbitMQ node: the machine's (node None: rabbitmqctl's default) or a throwaway one of this
    run's own. Tests take a vhost of their own on it, so runs and tests never share a queue."""

    port: int
    node: str | None = None
    directory: Path | None = None
    environment: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    def ctl(self, *args: str, timeout_s: float = 60) -> str:
        node = ["-n", self.node] if self.node else []
        command = _rabbitmq_user() + [str(RABBITMQ_BIN / "rabbitmqctl"), *node, *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def add_vhost(self) -> str:
        """A new vhost that guest may use fully: amqp://guest:guest@127.0.0.1:PORT/NAME."""
        name = f"imagegate-test-{os.getpid()}-{os.urandom(4).hex()}"
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{name}"

    def delete_vhost(self, url: str) -> None:
        try:
            self.ctl("delete_vhost", url.rsplit("/", 1)[1])
        except (RuntimeError, subprocess.TimeoutExpired):  # a node stopped by its test goes with its data
            pass

    def queue_types(self, url: str) -> dict[str, str]:
        """{queue: type} in the url's vhost, as RabbitMQ itself lists them."""
        lines = self.ctl("list_queues", "-p", url.rsplit("/", 1)[1], "name", "type", "--no-table-headers", "-q")
        return dict(line.split("\t")[:2] for line in lines.splitlines() if "\t" in line)

    # A throwaway node only: stopped (its Erlang VM gone, its port closed) and started again with
    # its data, as a restarted server.
    def pause(self) -> None:
        assert self.node and self.process, "only a throwaway RabbitMQ is stopped by tests"
        self.ctl("stop")
        self.process.wait(timeout=60)

    def resume(self) -> None:
        assert self.node
        self._boot()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.ctl("stop")
                self.process.wait(timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired):  # not answering: its whole process group
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _boot(self) -> None:
        log = (self.directory / "server.log").open("a")  # type: ignore[operator]
        self.process = subprocess.Popen(
            [*_rabbitmq_user(self.environment), str(RABBITMQ_BIN / "rabbitmq-server")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def listening() -> bool:
            if self.process.poll() is not None:  # type: ignore[union-attr]
                output = (self.directory / "server.log").read_text()[-3000:]  # type: ignore[operator]
                raise MissingService(f"rabbitmq-server exited at start:\n{output}")
            return reachable("127.0.0.1", self.port)

        wait_until(listening, 120, f"RabbitMQ node {self.node} to listen on {self.port}", interval_s=0.25)
        self.ctl("await_startup", "--timeout", "60", timeout_s=90)


def machine_rabbitmq() -> RabbitMQ | None:
    """The machine's RabbitMQ on 127.0.0.1:5672 when it answers and rabbitmqctl can reach it."""
    if not reachable("127.0.0.1", 5672) or not (RABBITMQ_BIN / "rabbitmqctl").exists():
        return None
    node = RabbitMQ(5672)
    try:
        node.ctl("status", timeout_s=30)
    except (RuntimeError, subprocess.TimeoutExpired):
        return None
    return node


def start_rabbitmq() -> RabbitMQ:
    """A throwaway RabbitMQ node of its own name, ports, data and config (the machine's node, if
    any, is left alone)."""
    if not (RABBITMQ_BIN / "rabbitmq-server").exists():
        raise MissingService(
            "RabbitMQ is not reachable at 127.0.0.1:5672 (or rabbitmqctl cannot manage it) and "
            "rabbitmq-server is not installed (apt-get install rabbitmq-server)"
        )
    directory = Path(tempfile.mkdtemp(prefix="imagegate-rabbitmq-"))
    port, dist_port = free_port(), free_port()
    (directory / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{port}\n")
    for name in ("env.conf", "enabled_plugins"):
        (directory / name).write_text("")
    if os.geteuid() == 0:
        for path in [directory, *directory.iterdir()]:
            shutil.chown(path, "rabbitmq")
    node = RabbitMQ(
        port,
        node=f"imagegate-{os.getpid()}-{os.urandom(3).hex()}@localhost",
        directory=directory,
    )
    node.environment = {
        "RABBITMQ_NODENAME": node.node,
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
        "RABBITMQ_LOG_BASE": str(directory / "log"),
        "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
        "RABBITMQ_CONF_ENV_FILE": str(directory / "env.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    }
    try:
        node._boot()
    except BaseException:  # a node that never came up is still this run's to stop and remove
        node.stop()
        raise
    return node
