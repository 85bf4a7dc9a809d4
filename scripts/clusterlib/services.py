"""What the hosts share, started on the bridge's address: a throwaway Postgres cluster, a
redis-server (the broker), HAProxy in front of the API hosts, and supervised processes."""

from __future__ import annotations

import csv
import glob
import io
import os
import shutil
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

from tests.support.services import reachable as port_open
from tests.support.services import wait_until


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class Proc:
    """A process started (in a host or in the root namespace), its output in a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None):
        self.name, self.log_path = name, log
        self._log = log.open("ab")
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, timeout_s: float = 15) -> None:
        for signum, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10)):
            if self.popen.poll() is not None:
                break
            try:
                os.killpg(self.popen.pid, signum)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        self._log.close()


def _postgres_binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found[-1]:
        raise SystemExit(f"scripts/cluster: {name} not found (apt-get install postgresql)")
    return found[-1]


class Postgres:
    """Its own cluster listening on the bridge (trusting the cluster's subnet), run as the
    `postgres` user. A lost host's connections are dropped within seconds (keepalives), and a
    transaction it left open is ended (idle_in_transaction_session_timeout), so the rows it held
    are not locked until the kernel's 2-hour keepalive."""

    def __init__(self, directory: Path, address: str, cidr: str, max_connections: int = 300):
        self.directory = directory / "pg"
        self.directory.mkdir()
        self.address = address
        shutil.chown(self.directory, "postgres")
        self.run_as = ["runuser", "-u", "postgres", "--"]
        self.port = free_port(address)
        self.data = self.directory / "data"
        self.pg_ctl = _postgres_binary("pg_ctl")
        subprocess.run(
            [*self.run_as, _postgres_binary("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {cidr} trust\n")
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses={address} "
            f"-c max_connections={max_connections} -c shared_buffers=64MB -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off "
            "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3 "
            "-c idle_in_transaction_session_timeout=10s -c tcp_user_timeout=10000"
        )
        subprocess.run(
            [*self.run_as, self.pg_ctl, "-D", str(self.data), "-l", str(self.directory / "log"), "-w", "-o", options,
             "start"],
            check=True,
            capture_output=True,
            timeout=120,
        )  # fmt: skip

    def url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://postgres@{self.address}:{self.port}/{database}"

    def stop(self) -> None:
        subprocess.run(
            [*self.run_as, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )


class Redis:
    def __init__(self, directory: Path, address: str):
        binary = shutil.which("redis-server")
        if not binary:
            raise SystemExit("scripts/cluster: redis-server not found (apt-get install redis-server)")
        self.address, self.port = address, free_port(address)
        self.proc = Proc(
            "redis",
            [binary, "--port", str(self.port), "--bind", address, "--protected-mode", "no", "--save", "",
             "--appendonly", "no", "--maxclients", "10000", "--tcp-keepalive", "10"],
            directory / "redis.log",
        )  # fmt: skip
        wait_until(lambda: port_open(address, self.port), 20, "redis-server")

    def url(self, db: int = 0) -> str:
        return f"redis://{self.address}:{self.port}/{db}"


class Balancer:
    """HAProxy in front of the API hosts. A server failing its /healthz twice (0.5 s apart) is
    taken out and the requests it held are cut (the client retries); a connection that cannot be
    made is retried on the other server."""

    def __init__(self, directory: Path, address: str, servers: dict[str, str]):
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(binary).exists():
            raise SystemExit("scripts/cluster: haproxy not found (scripts/balancer installs it)")
        self.address, self.port, self.stats_port = address, free_port(address), free_port(address)
        config = directory / "haproxy.cfg"
        backends = "\n".join(f"    server {name} {target} check" for name, target in servers.items())
        config.write_text(f"""global
    maxconn 4000

defaults
    mode http
    timeout connect 1s
    timeout client 300s
    timeout server 300s
    timeout check 1s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response

frontend api
    bind {address}:{self.port}
    default_backend apis

backend apis
    balance roundrobin
    option httpchk GET /healthz
    http-response set-header X-Served-By %s
    default-server inter 500ms fall 2 rise 2 on-marked-down shutdown-sessions
{backends}

listen stats
    bind {address}:{self.stats_port}
    stats enable
    stats uri /stats
""")
        check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True)
        if check.returncode:
            raise SystemExit(f"scripts/cluster: haproxy refused its configuration: {check.stdout}{check.stderr}")
        self.proc = Proc("haproxy", [binary, "-db", "-f", str(config)], directory / "haproxy.log")
        wait_until(lambda: port_open(address, self.port), 20, "haproxy")
        self.url = f"http://{address}:{self.port}"

    def servers(self) -> dict[str, dict]:
        """Per API server: its state as HAProxy sees it and the sessions (connections) it was given."""
        with urllib.request.urlopen(f"http://{self.address}:{self.stats_port}/stats;csv", timeout=5) as reply:
            text = reply.read().decode().lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: {
                "status": row["status"],
                "sessions": int(row["stot"] or 0),
                "current": int(row["scur"] or 0),
            }
            for row in rows
            if row["pxname"] == "apis" and row["svname"] not in ("BACKEND", "FRONTEND")
        }
