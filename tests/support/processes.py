"""The imagegate processes under test, started as users start them: through the console script."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.services import http_ok, wait_until

IMAGEGATE = [str(Path(sys.executable).with_name("imagegate"))]  # the console script, as users run it


def run_cli(args: list[str], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(IMAGEGATE + args, env=env, capture_output=True, text=True, timeout=120, **kwargs)


def start_process(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(IMAGEGATE + args, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(process: subprocess.Popen, timeout_s: float = 30) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def create_key(env, name: str) -> str:
    result = run_cli(["keys", "create", "--name", name], env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def start_worker(env: dict[str, str], log: Path, *extra: str, concurrency: int = 10) -> subprocess.Popen:
    """`imagegate worker`, returned once it says it is ready (its log is in the failure otherwise)."""
    process = start_process(["worker", "--concurrency", str(concurrency), *extra], env, log)
    wait_until(lambda: process.poll() is not None or "ready" in log.read_text(), 60, "the Celery worker")
    assert process.poll() is None, log.read_text()
    return process


def start_api(env: dict[str, str], log: Path, port: int, *extra: str, workers: int = 1) -> subprocess.Popen:
    """`imagegate api` on 127.0.0.1:port, returned once /healthz answers (its log is in the failure otherwise)."""
    process = start_process(
        ["api", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), *extra], env, log
    )

    def healthy() -> bool:
        assert process.poll() is None, log.read_text()
        return http_ok(f"http://127.0.0.1:{port}/healthz")

    wait_until(healthy, 60, "the API server")
    return process
