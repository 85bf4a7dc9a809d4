"""The bench's world: its Postgres and Redis, the fake upstream, imagegate started with its documented
commands, and the naive baselines. Every process goes through the Stack, which stops them all."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg

from benchlib import naive_celery
from benchlib.services import Postgres, Proc, Redis, Stack, free_port, port_open, wait_until

MODEL = "bench-image"
LITELLM_KEY = "sk-bench-" + secrets.token_hex(16)
ERROR_PATTERNS = ("Traceback", "ERROR", "MaxConnectionsError", "Couldn't ack")
NAIVE_REDIS_DB = 1


def log_errors(text: str) -> dict:
    """Lines of a log matching each error pattern, and the lines matching any."""
    counts = {pattern: 0 for pattern in ERROR_PATTERNS}
    total = 0
    for line in text.splitlines():
        hits = [pattern for pattern in ERROR_PATTERNS if pattern in line]
        for pattern in hits:
            counts[pattern] += 1
        total += bool(hits)
    return {"error lines": total, **counts}


class Environment:
    def __init__(self, stack: Stack, repo: Path, *, latency_s: float, image_kb: int, say):
        self.stack, self.repo, self.say = stack, repo, say
        self.latency_s = latency_s
        self.bin = repo / ".venv" / "bin"
        self.scripts = repo / "scripts"
        say("starting Postgres (own cluster) and redis-server ...")
        stack.postgres = self.pg = Postgres(stack.directory)
        stack.redis = self.redis = Redis(stack.directory)
        self.pg.create_database("imagegate")
        self.pg.create_database("naive")
        with psycopg.connect(self.pg.url("naive", "postgresql"), autocommit=True) as conn:
            for statement in naive_celery.SCHEMA:
                conn.execute(statement)

        self.upstream_port = free_port()
        self.upstream = stack.start(
            "upstream",
            [
                sys.executable,
                "-m",
                "benchlib.fake_upstream",
                "--port",
                str(self.upstream_port),
                "--latency-s",
                str(latency_s),
                "--image-kb",
                str(image_kb),
            ],
            cwd=str(self.scripts),
        )
        wait_until(lambda: port_open(self.upstream_port), 30, "the fake upstream")
        self.upstream_url = f"http://127.0.0.1:{self.upstream_port}/v1/images/generations"

        providers = stack.directory / "providers.toml"
        providers.write_text(
            f'[models."{MODEL}"]\nadapter = "openai"\nbase_url = "http://127.0.0.1:{self.upstream_port}/v1"\n'
            f'api_key_env = "BENCH_UPSTREAM_KEY"\ntimeout_s = 600\nallow_private_downloads = true\n'
        )
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.env = {
            **os.environ,
            "IMAGEGATE_DATABASE_URL": self.pg.url("imagegate"),
            "IMAGEGATE_BROKER_URL": self.redis.url(0),
            "IMAGEGATE_SECRET_KEY": secrets.token_urlsafe(48),
            "IMAGEGATE_PROVIDERS_FILE": str(providers),
            "IMAGEGATE_PUBLIC_URL": self.api_url,
            "BENCH_UPSTREAM_KEY": "sk-upstream-bench",
        }
        say("imagegate db upgrade; imagegate keys create --name bench ...")
        self._imagegate("db", "upgrade")
        self.key = self._imagegate("keys", "create", "--name", "bench").strip().splitlines()[-1].strip()
        self.naive_env = {
            **os.environ,
            "NAIVE_BROKER_URL": self.redis.url(NAIVE_REDIS_DB),
            "NAIVE_DATABASE_URL": self.pg.url("naive"),
            "NAIVE_UPSTREAM_URL": self.upstream_url,
            "PYTHONPATH": str(self.scripts),
        }
        self.api: Proc | None = None
        self.api_workers: int | None = None
        self.worker: Proc | None = None
        self.worker_args: tuple = ()
        self.litellm: Proc | None = None
        self.litellm_error: str | None = None

    # -- imagegate, with its documented commands --------------------------------------------------
    def _imagegate(self, *args: str) -> str:
        done = subprocess.run(
            [str(self.bin / "imagegate"), *args], env=self.env, capture_output=True, text=True, timeout=300
        )
        if done.returncode:
            raise RuntimeError(f"imagegate {' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def ensure_api(self, workers: int | None = None) -> Proc:
        """`imagegate api` (its defaults) or `imagegate api --workers N`, restarted when that changes."""
        if self.api is not None and self.api_workers == workers and self.api.alive():
            return self.api
        if self.api is not None:
            self.stack.stop(self.api)
        args = ["api", "--port", str(self.api_port)] + (["--workers", str(workers)] if workers else [])
        self.api = self.stack.start("api", [str(self.bin / "imagegate"), *args], env=self.env)
        self.api_workers = workers
        wait_until(lambda: _http_ok(f"{self.api_url}/healthz"), 60, "imagegate api")
        return self.api

    def start_worker(self, *args: str) -> Proc:
        self.stop_worker()
        self.worker = self.stack.start("worker", [str(self.bin / "imagegate"), "worker", *args], env=self.env)
        self.worker_args = args
        return self.worker

    def ensure_worker(self, *args: str) -> Proc:
        if self.worker is not None and self.worker.alive() and self.worker_args == args:
            return self.worker
        worker = self.start_worker(*args)
        wait_ready(worker)
        return worker

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.stack.stop(self.worker)
            self.worker = None

    def task_counts(self, conn) -> dict:
        rows = conn.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall()
        return dict(rows)

    def commits(self, conn, database: str) -> int:
        return conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (database,)).fetchone()[0]

    # -- broker ---------------------------------------------------------------------------------
    def queue_length(self, queue: str, db: int = 0) -> int:
        """Messages waiting in a kombu Redis queue (its priority sub-lists included)."""
        client = self.redis.client(db)
        total = 0
        for key in client.scan_iter(match=f"{queue}*", count=1000):
            name = key.decode(errors="replace")
            if name == queue or name.startswith(queue + "\x06\x16"):
                total += client.llen(key)
        return total

    def drop_queues(self) -> None:
        """Forget messages left by rows that ran without a worker."""
        for db in (0, NAIVE_REDIS_DB):
            client = self.redis.client(db)
            for key in list(client.scan_iter(match="*", count=1000)):
                if not key.startswith(b"_kombu"):
                    client.delete(key)

    # -- fake upstream --------------------------------------------------------------------------
    def upstream_control(self, path: str, body: dict | None = None) -> dict:
        base = f"http://127.0.0.1:{self.upstream_port}"
        if body is None and path == "_stats":
            return httpx.get(f"{base}/_stats", timeout=10).json()
        return httpx.post(f"{base}/{path}", json=body or {}, timeout=10).json()

    def set_latency(self, seconds: float) -> None:
        self.upstream_control("_config", {"latency_s": seconds})

    # -- naive baselines ------------------------------------------------------------------------
    def start_naive_worker(self) -> Proc:
        return self.stack.start(
            "naive-celery",
            [
                str(self.bin / "celery"),
                "-A",
                "benchlib.naive_celery",
                "worker",
                "--pool",
                "threads",
                "--concurrency",
                "64",
                "-Q",
                naive_celery.QUEUE,
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
            ],
            env=self.naive_env,
            cwd=str(self.scripts),
        )

    def start_naive_flask(self) -> tuple[Proc, str]:
        port = free_port()
        proc = self.stack.start(
            "naive-flask",
            [
                str(self.bin / "gunicorn"),
                "-k",
                "gthread",
                "--threads",
                "8",
                "--workers",
                "2",
                "-b",
                f"127.0.0.1:{port}",
                "--log-level",
                "warning",
                "benchlib.naive_flask:app",
            ],
            env=self.naive_env,
            cwd=str(self.scripts),
        )
        wait_until(lambda: port_open(port), 60, "the naive Flask app")
        return proc, f"http://127.0.0.1:{port}"

    def ensure_litellm(self) -> str | None:
        """LiteLLM proxy (its own venv under .bench/) in front of the fake upstream; None if unavailable."""
        if self.litellm is not None and self.litellm.alive():
            return self.litellm_url
        if self.litellm_error:
            return None
        try:
            binary = _litellm_venv(self.repo, self.say)
        except RuntimeError as error:
            self.litellm_error = str(error)
            return None
        config = self.stack.directory / "litellm.yaml"
        config.write_text(
            json.dumps(
                {  # JSON is YAML
                    "model_list": [
                        {
                            "model_name": MODEL,
                            "litellm_params": {
                                "model": f"openai/{MODEL}",
                                "api_key": "sk-upstream-bench",
                                "api_base": f"http://127.0.0.1:{self.upstream_port}/v1",
                            },
                            "model_info": {"mode": "image_generation"},
                        }
                    ],
                    "litellm_settings": {"drop_params": True, "telemetry": False},
                }
            )
        )
        port = free_port()
        env = {
            **os.environ,
            "LITELLM_MASTER_KEY": LITELLM_KEY,
            "LITELLM_LOG": "ERROR",
            "LITELLM_TELEMETRY": "False",
            "NO_DOCKER": "1",
        }
        self.litellm = self.stack.start(
            "litellm",
            [str(binary), "--config", str(config), "--port", str(port), "--num_workers", "1"],
            env=env,
            cwd=str(self.stack.directory),
        )
        self.litellm_url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: port_open(port) or not self.litellm.alive(), 120, "LiteLLM proxy")
            if not self.litellm.alive():
                raise RuntimeError("LiteLLM exited: " + self.litellm.log_text()[-500:])
        except (TimeoutError, RuntimeError) as error:
            self.litellm_error = str(error)
            return None
        return self.litellm_url


def _litellm_venv(repo: Path, say) -> Path:
    venv = repo / ".bench" / "venv-litellm"
    binary = venv / "bin" / "litellm"
    if binary.exists():
        return binary
    say("installing litellm[proxy] into .bench/venv-litellm (first run only) ...")
    venv.parent.mkdir(exist_ok=True)
    for command in (
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if done.returncode:
            raise RuntimeError(f"installing LiteLLM failed: {done.stderr[-300:]}")
    return binary


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_ready(worker: Proc, timeout_s: float = 90) -> float:
    """Wait for Celery's `ready.` line; returns when it was seen."""

    def ready():
        if not worker.alive():
            raise RuntimeError(f"{worker.name} exited: {worker.log_text()[-1500:]}")
        return re.search(r"\bready\.", worker.log_text())

    wait_until(ready, timeout_s, f"{worker.name} to be ready", interval_s=0.05)
    return time.time()
