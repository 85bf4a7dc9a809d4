"""The whole demonstration's world: the namespaces, the shared services on the bridge, and
imagegate's processes on their hosts, started with the documented commands (`imagegate api`,
`worker`, `sweeper`). close() stops everything and removes the namespaces, whatever happened."""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from clusterlib.network import Host, Network
from clusterlib.services import Balancer, Postgres, Proc, Redis
from tests.support.fake_receiver import Receiver
from tests.support.fake_upstream import FakeUpstream, Step
from tests.support.services import http_ok, wait_until

MODEL = "cluster-image"
# A model with per-model upstream limits, which every worker on every host keeps together (in Redis).
LIMITED_MODEL = "cluster-limited"
LIMITS = {"max_concurrency": 4, "rpm": 60}
API_PORT = 8000
API_HOSTS = ("api1", "api2")
WORKER_HOSTS = ("worker1", "worker2", "worker3")


def _cpu_s(pid: int, children_too: bool = False) -> float:
    """utime + stime of a process from /proc (and of its reaped children, if asked)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children_too else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


@dataclass(frozen=True)
class Options:
    latency_s: float = 1.0  # the fake upstream's answer time
    concurrency: int = 10  # `imagegate worker --concurrency`, one worker process per host
    lease_s: float = 10.0
    sweep_interval_s: float = 1.0
    republish_after_s: float = 10.0
    api_processes: int = 1  # `imagegate api --workers`, per API host
    keep: bool = False  # keep the logs' directory


class Cluster:
    def __init__(self, repo: Path, options: Options, say=print):
        self.repo, self.options, self.say = repo, options, say
        self.bin = Path(sys.executable).parent
        self.directory = Path(tempfile.mkdtemp(prefix="imagegate-cluster-"))
        os.chmod(self.directory, 0o755)  # Postgres runs as `postgres` and keeps its socket below
        self.procs: dict[str, Proc] = {}
        self.network: Network | None = None
        self.postgres: Postgres | None = None
        self.redis: Redis | None = None
        self.balancer: Balancer | None = None
        self.upstream: FakeUpstream | None = None
        self.receiver: Receiver | None = None

    # -- building it --------------------------------------------------------------------------
    def start(self) -> None:
        self.network = network = Network()
        say = self.say
        say(f"bridge {network.bridge} {network.gateway}/24; hosts: {', '.join(API_HOSTS + WORKER_HOSTS)}, sweeper")
        for index, name in enumerate(API_HOSTS, 11):
            network.add_host(name, index)
        for index, name in enumerate(WORKER_HOSTS, 21):
            network.add_host(name, index)
        network.add_host("sweeper", 31)
        gateway = network.gateway
        say(f"Postgres and redis-server of this run on {gateway} ...")
        self.postgres = Postgres(self.directory, gateway, network.cidr)
        self.redis = Redis(self.directory, gateway)
        with psycopg.connect(self.postgres.url("postgres", "postgresql"), autocommit=True) as conn:
            conn.execute('CREATE DATABASE "imagegate"')
        self.upstream = FakeUpstream(gateway).start()
        self.upstream.default_step = functools.partial(Step, delay_s=self.options.latency_s)
        self.receiver = Receiver(gateway).start()
        self.balancer = Balancer(
            self.directory, gateway, {name: f"{network.hosts[name].address}:{API_PORT}" for name in API_HOSTS}
        )
        self.env = self._environment()
        self.imagegate("db", "upgrade")
        self.start_host_process("sweeper", ["sweeper"])
        for name in API_HOSTS:
            self.start_api(name)
        say(f"HAProxy {self.balancer.url} -> {', '.join(API_HOSTS)}; sweeper running")

    def _environment(self) -> dict[str, str]:
        providers = self.directory / "providers.toml"
        providers.write_text(
            f'[models."{MODEL}"]\nadapter = "openai"\nbase_url = "{self.upstream.base_url}"\n'
            "timeout_s = 30\nmax_retries = 10\n"
            f'\n[models."{LIMITED_MODEL}"]\nadapter = "openai"\nbase_url = "{self.upstream.base_url}"\n'
            "timeout_s = 30\nmax_retries = 10\n" + "".join(f"{name} = {value}\n" for name, value in LIMITS.items())
        )
        options = self.options
        return {name: value for name, value in os.environ.items() if not name.startswith("IMAGEGATE_")} | {
            "IMAGEGATE_DATABASE_URL": self.postgres.url("imagegate"),
            "IMAGEGATE_BROKER_URL": self.redis.url(0),
            "IMAGEGATE_PROVIDERS_FILE": str(providers),
            "IMAGEGATE_SECRET_KEY": secrets.token_urlsafe(48),
            "IMAGEGATE_PUBLIC_URL": self.balancer.url,
            "IMAGEGATE_WEBHOOK_ALLOW_PRIVATE": "true",  # the receiver is on the bridge, a private address
            "IMAGEGATE_WEBHOOK_RETRY_SCHEDULE": "1,2,5,10,30",
            # Every "host" shares this machine's cores: one worker process each, so hosts are what scale.
            "IMAGEGATE_WORKER_PROCESSES": "1",
            "IMAGEGATE_LEASE_S": str(options.lease_s),
            "IMAGEGATE_SWEEP_INTERVAL_S": str(options.sweep_interval_s),
            "IMAGEGATE_REPUBLISH_AFTER_S": str(options.republish_after_s),
            "IMAGEGATE_RETRY_BASE_S": "0.5",
            "IMAGEGATE_RETRY_MAX_S": "5",
            "IMAGEGATE_SYNC_TIMEOUT_S": "120",
            "IMAGEGATE_SHUTDOWN_GRACE_S": "10",
            "IMAGEGATE_LOG_FORMAT": "text",
            "IMAGEGATE_LOG_LEVEL": "WARNING",
        }

    def imagegate(self, *args: str) -> str:
        done = subprocess.run(
            [str(self.bin / "imagegate"), *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        if done.returncode:
            raise RuntimeError(f"imagegate {' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def create_key(self, name: str) -> tuple[str, str]:
        """(the key, its id) for one run: a run's tasks are that key's tasks."""
        key = self.imagegate("keys", "create", "--name", name).strip().splitlines()[-1].strip()
        with self.connect() as conn:
            key_id = conn.execute("SELECT id::text FROM api_keys WHERE name = %s", (name,)).fetchone()[0]
        return key, key_id

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.postgres.url("imagegate", "postgresql"), autocommit=True)

    # -- the hosts' processes ------------------------------------------------------------------
    def host(self, name: str) -> Host:
        return self.network.hosts[name]

    def start_host_process(self, name: str, args: list[str]) -> Proc:
        host = self.host(name)
        argv = host.command([str(self.bin / "imagegate"), *args])
        proc = Proc(name, argv, self.directory / f"{name}-{len(self.procs)}.log", env=self.env)
        self.procs[name] = proc
        return proc

    def start_api(self, name: str) -> None:
        address = self.host(name).address
        proc = self.start_host_process(
            name, ["api", "--host", address, "--port", str(API_PORT), "--workers", str(self.options.api_processes)]
        )

        def healthy() -> bool:
            if not proc.alive():
                raise RuntimeError(f"imagegate api on {name} exited:\n{proc.log_text()[-3000:]}")
            return http_ok(f"http://{address}:{API_PORT}/healthz")

        wait_until(healthy, 90, f"imagegate api on {name}")

    def start_workers(self, names) -> None:
        started = []
        for name in names:
            if name in self.procs and self.procs[name].alive():
                continue
            started.append(
                self.start_host_process(
                    name, ["worker", "--concurrency", str(self.options.concurrency), "--loglevel", "INFO"]
                )
            )
        for proc in started:

            def ready(proc=proc) -> bool:
                if not proc.alive():
                    raise RuntimeError(f"imagegate worker on {proc.name} exited:\n{proc.log_text()[-3000:]}")
                return " ready" in proc.log_text()

            wait_until(ready, 90, f"imagegate worker on {proc.name}")

    def stop_workers(self, names) -> None:
        for name in names:
            proc = self.procs.get(name)
            if proc is not None:
                proc.stop()

    def kill_host(self, name: str) -> int:
        return self.host(name).kill()

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds used so far by each host's processes, and by Postgres (all its backends)."""
        used = {name: sum(_cpu_s(pid) for pid in host.pids()) for name, host in self.network.hosts.items()}
        postmaster = int((self.postgres.data / "postmaster.pid").read_text().split()[0])
        used["postgres"] = _cpu_s(postmaster, children_too=True) + sum(map(_cpu_s, _children(postmaster)))
        return used

    def worker_names(self) -> list[str]:
        return [name for name in WORKER_HOSTS if name in self.procs and self.procs[name].alive()]

    # -- the end ------------------------------------------------------------------------------
    def close(self) -> None:
        procs = list(self.procs.values())
        for proc in procs:  # all at once: each worker may take IMAGEGATE_SHUTDOWN_GRACE_S
            proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + 12
        for proc in procs:
            try:
                proc.stop(timeout_s=max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - cleanup goes on whatever one process did
                pass
        for part in (self.balancer and self.balancer.proc, self.redis and self.redis.proc):
            if part:
                part.stop()
        for server in (self.upstream, self.receiver):
            if server is not None:
                server.stop()
        if self.postgres is not None:
            self.postgres.stop()
        if self.network is not None:
            self.network.close()
        if self.options.keep:
            self.say(f"logs kept in {self.directory}")
        else:
            shutil.rmtree(self.directory, ignore_errors=True)
