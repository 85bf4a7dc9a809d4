"""Acceptance through the real `imagegate` command: embedded mode, start-up refusals, keys,
and the rule that the web process never loads worker code and workers never load Flask."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
from importlib.metadata import version

import httpx
import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from tests.support.processes import IMAGEGATE, run_cli, stop_process
from tests.support.services import free_port, wait_until


def clean_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("IMAGEGATE_")}


# `up` gives each of its processes 30 s to stop (app/embedded.py stop), all at once, then exits.
UP_STOPS_WITHIN_S = 45


def start_up(cwd, log, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        IMAGEGATE + ["up", *args],
        cwd=cwd,
        env=clean_env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def banner(process: subprocess.Popen, log) -> tuple[str, str]:
    """The curl line and the key, as soon as `up` prints them (it must not have ended before)."""

    def printed():
        assert process.poll() is None, log.read_text()
        return re.search(r"^\s*(curl .*)$", log.read_text(), re.M)

    curl = wait_until(printed, 90, "the curl line").group(1)
    return curl, re.search(r"Bearer (ig_\S+)'", curl).group(1)


def run_curl(curl: str) -> dict:
    result = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=120)
    return httpx.Response(200, content=result.stdout).json()


def test_up_serves_the_local_model_with_no_servers(tmp_path):
    port, work = free_port(), tmp_path / "work"
    work.mkdir()
    # A directory holding packages named like ours (any Flask project's app/) must not be imported.
    for name in ("app", "workers", "client", "migrations"):
        (work / name).mkdir()
        (work / name / "__init__.py").write_text("raise ImportError('the wrong package was imported')\n")
    log = tmp_path / "up.log"
    process = start_up(work, log, "--port", str(port))
    try:
        curl, key = banner(process, log)
        # The printed curl line works as printed, pasted at once: `up` says up only when it is.
        body = run_curl(curl)
        image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
        assert image.format == "PNG" and image.size == (1024, 1024)
        # And a URL result is served from the SQLite file.
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/images/generations",
            timeout=120,
            headers={"Authorization": f"Bearer {key}"},
            json={"prompt": "a kite", "size": "128x96", "response_format": "url"},
        ).json()
        png = httpx.get(reply["data"][0]["url"])
        assert png.headers["content-type"] == "image/png" and Image.open(io.BytesIO(png.content)).size == (128, 96)
        # Quiet: no Celery banner or gunicorn lines between the user and the key.
        assert "celery" not in log.read_text().lower() and "gunicorn" not in log.read_text().lower()
    finally:
        stop_process(process, UP_STOPS_WITHIN_S)
    assert process.returncode == 0, log.read_text()
    data = work / "imagegate-data"
    assert (data / "imagegate.db").exists()
    assert (data / "api_key").stat().st_mode & 0o777 == 0o600
    # Nothing lands in the working directory but the data directory (kombu's control/ used to).
    assert sorted(path.name for path in work.iterdir()) == ["app", "client", "imagegate-data", "migrations", "workers"]

    # Run again: the same key, still working; then a dead worker ends `up` with its last lines.
    log = tmp_path / "up-again.log"
    process = start_up(work, log, "--port", str(port))
    try:
        curl, again = banner(process, log)
        assert again == key and "kept from the last run" in log.read_text()
        assert run_curl(curl)["data"][0]["b64_json"]
        with create_engine(f"sqlite:///{data / 'imagegate.db'}").connect() as connection:
            worker_pid = connection.execute(
                text("SELECT pid FROM heartbeats WHERE kind = 'worker' ORDER BY started_at DESC LIMIT 1")
            ).scalar_one()
        os.kill(worker_pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        stop_process(process, UP_STOPS_WITHIN_S)
    output = log.read_text()
    assert process.returncode != 0
    assert "imagegate worker stopped" in output and "its last lines" in output and "Traceback" not in output
    assert (data / "logs" / "worker.log").read_text().strip().splitlines()[-1] in output


def test_up_refuses_a_busy_port_before_printing_a_key(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_cli(["up", "--port", str(port), "--data-dir", str(tmp_path / "data")], clean_env(), cwd=tmp_path)
    assert result.returncode != 0
    assert f"port {port}" in result.stderr and "--port" in result.stderr
    assert "ig_" not in result.stdout + result.stderr and "curl" not in result.stdout
    assert "Traceback" not in result.stderr and not (tmp_path / "data").exists()


def test_version():
    result = run_cli(["--version"], clean_env())
    assert result.returncode == 0 and result.stdout.strip() == f"imagegate, version {version('imagegate')}"


@pytest.mark.parametrize(
    "command", [["api", "--port", "1"], ["worker"], ["worker", "--processes", "2"]], ids=["api", "worker", "group"]
)
def test_a_bad_providers_file_stops_start_up_with_a_clear_message(tmp_path, env, command):
    path = tmp_path / "providers.toml"
    path.write_text('[models."sdxl"]\nadapter = "stable-diffusion"\nbase_url = "https://x"\n')
    result = run_cli(command, env | {"IMAGEGATE_PROVIDERS_FILE": str(path)})
    assert result.returncode != 0
    assert str(path) in result.stderr and "'sdxl'" in result.stderr and "'adapter'" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("'sdxl'") == 1  # said once, not per process


def test_the_api_refuses_the_default_secret(env):
    result = run_cli(["api", "--port", "1"], env | {"IMAGEGATE_SECRET_KEY": "change-me"})
    assert result.returncode != 0 and "IMAGEGATE_SECRET_KEY" in result.stderr
    assert "Traceback" not in result.stderr


def test_keys_create_prints_the_key_last_and_stores_only_its_hash(env, database_url, migrated):
    result = run_cli(["keys", "create", "--name", "ci"], env)
    key = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"ig_[A-Za-z0-9_-]{40,}", key)
    with create_engine(database_url).connect() as connection:
        rows = connection.execute(text("SELECT name, prefix, key_hash FROM api_keys")).all()
    assert any(row.name == "ci" for row in rows)
    assert all(key not in (row.prefix, row.key_hash) for row in rows)


CHECK_WEB = """
from imagegate.app.settings import Settings
from imagegate.app.web import create_app
app = create_app(Settings())
app.test_client().get('/healthz')
import sys
loaded = sorted(m for m in sys.modules if m == 'httpx' or m.startswith(('imagegate.workers', 'httpx.')))
assert not loaded, loaded
"""

CHECK_WORKER = """
from imagegate.app.settings import Settings
from imagegate.workers.celery_app import make_worker_app
make_worker_app(Settings())
import sys
web = ('flask', 'werkzeug', 'imagegate.app.web')
loaded = sorted(m for m in sys.modules if m in web or m.startswith(tuple(name + '.' for name in web)))
assert not loaded, loaded
"""


@pytest.mark.parametrize("program", [CHECK_WEB, CHECK_WORKER], ids=["web", "worker"])
def test_the_web_never_loads_worker_code_and_workers_never_load_flask(env, program):
    result = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
