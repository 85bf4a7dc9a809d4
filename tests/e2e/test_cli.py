"""Acceptance through the real `imagegate` command: embedded mode, start-up refusals, keys,
and the rule that the web process never loads worker code and workers never load Flask."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys

import httpx
import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from tests.support.processes import IMAGEGATE, run_cli, stop_process
from tests.support.services import free_port, http_ok, wait_until


def clean_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("IMAGEGATE_")}


def test_up_serves_the_local_model_with_no_servers(tmp_path):
    port = free_port()
    # A directory holding packages named like ours (any Flask project's app/) must not be imported.
    for name in ("app", "workers", "client", "migrations"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('the wrong package was imported')\n")
    log = tmp_path / "up.log"
    process = subprocess.Popen(
        IMAGEGATE + ["up", "--port", str(port)],
        cwd=tmp_path,
        env=clean_env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        curl = wait_until(lambda: re.search(r"^\s*(curl .*)$", log.read_text(), re.M), 60, "the curl line")
        key = re.search(r"API key \(shown once\): (\S+)", log.read_text()).group(1)
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 60, "the embedded API")
        # The printed curl line works as printed.
        result = subprocess.run(curl.group(1), shell=True, capture_output=True, text=True, timeout=120)
        body = httpx.Response(200, content=result.stdout).json()
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
        assert (tmp_path / "imagegate-data" / "imagegate.db").exists()
    finally:
        stop_process(process)


@pytest.mark.parametrize("command", [["api", "--port", "1"], ["worker"]])
def test_a_bad_providers_file_stops_start_up_with_a_clear_message(tmp_path, env, command):
    path = tmp_path / "providers.toml"
    path.write_text('[models."sdxl"]\nadapter = "stable-diffusion"\nbase_url = "https://x"\n')
    result = run_cli(command, env | {"IMAGEGATE_PROVIDERS_FILE": str(path)})
    assert result.returncode != 0
    assert str(path) in result.stderr and "'sdxl'" in result.stderr and "'adapter'" in result.stderr
    assert "Traceback" not in result.stderr


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
