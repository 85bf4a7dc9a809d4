"""`imagegate` subcommands. Each one imports only what its process needs: `api` never loads
worker code, `worker` never loads Flask."""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from app.settings import Settings, SettingsError


def load_settings(**overrides) -> Settings:
    try:
        return Settings(**overrides).check()
    except (SettingsError, ValidationError) as exc:
        raise click.ClickException(f"configuration: {exc}") from None


def _providers_guard(func):
    """Show a bad providers file as one clear line, not a traceback."""
    from functools import wraps

    from app.providers import ProvidersFileError

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ProvidersFileError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


@click.group()
def cli() -> None:
    """imagegate: OpenAI-compatible image generation as durable jobs."""
    logging.basicConfig(level=os.environ.get("IMAGEGATE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to the newest schema (Alembic head)."""
    from app.migrate import upgrade

    upgrade(load_settings().database_url)
    click.echo("database is at head")


@cli.group()
def keys() -> None:
    """API keys."""


@keys.command("create")
@click.option("--name", required=True, help="What the key is for.")
def keys_create(name: str) -> None:
    """Create an API key; the key is printed once, alone on the last line."""
    from app.db import make_engine, make_sessionmaker
    from app.keys import create_key

    key = create_key(make_sessionmaker(make_engine(load_settings().database_url)), name)
    click.echo(f"Created API key {name!r}. It is shown only now; store it:")
    click.echo(key)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=int, help="gunicorn worker processes.")
@click.option("--connections", default=1000, show_default=True, type=int,
              help="Concurrent requests per process (greenlets).")
@_providers_guard
def api(host: str, port: int, workers: int, connections: int) -> None:
    """Serve the intake API with gunicorn (gevent workers)."""
    from app.providers import load_models
    from app.web.server import serve

    settings = load_settings()
    load_models(settings.providers_file)  # fail here, once, with a clear message
    serve(settings, host=host, port=port, workers=workers, connections=connections)


@cli.command()
@click.option("--pool", "-P", default="gevent", show_default=True,
              type=click.Choice(["gevent", "threads", "prefork", "solo"]))
@click.option("--concurrency", "-c", default=100, show_default=True, type=int,
              help="Tasks in flight per worker process.")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--hostname", "-n", default=None, help="Worker name (default: imagegate-PID@HOST).")
@_providers_guard
def worker(pool: str, concurrency: int, loglevel: str, hostname: str | None) -> None:
    """Run a Celery worker (an I/O-bound pool keeps many upstream calls in flight)."""
    from app.queue import QUEUE
    from workers.celery_app import make_worker_app

    celery = make_worker_app(load_settings(), concurrency=concurrency)
    celery.worker_main([
        "worker", f"--pool={pool}", f"--concurrency={concurrency}", f"--loglevel={loglevel}",
        f"--queues={QUEUE}", f"--hostname={hostname or f'imagegate-{os.getpid()}@%h'}",
        "--without-gossip", "--without-mingle",
    ])


@cli.command()
@click.option("--once", is_flag=True, help="One pass, then exit (for cron or a test).")
def sweeper(once: bool) -> None:
    """Find and resend what the broker lost: overdue pending tasks, expired leases, deadlines.
    Safe to run on several hosts at once."""
    import signal
    import threading

    from app.sweeper import make_sweeper

    sweep = make_sweeper(load_settings())
    if once:
        click.echo(str(sweep.sweep_once()))
        return
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    sweep.run(stop)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--data-dir", default="imagegate-data", show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@_providers_guard
def up(host: str, port: int, data_dir: Path) -> None:
    """Everything on one machine with no servers: SQLite file, filesystem broker, API and worker."""
    from app.db import make_engine, make_sessionmaker
    from app.keys import create_key
    from app.migrate import upgrade
    from app.providers import load_models
    from app.web.server import serve

    data_dir = data_dir.resolve()
    (data_dir / "broker").mkdir(parents=True, exist_ok=True)
    secret_file = data_dir / "secret_key"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(48))
        secret_file.chmod(0o600)
    # Explicit IMAGEGATE_* variables win; the rest is the embedded default.
    for name, value in {
        "IMAGEGATE_EMBEDDED": "1",
        "IMAGEGATE_DATA_DIR": str(data_dir),
        "IMAGEGATE_DATABASE_URL": f"sqlite:///{data_dir / 'imagegate.db'}",
        "IMAGEGATE_BROKER_URL": "filesystem://",
        "IMAGEGATE_SECRET_KEY": secret_file.read_text().strip(),
        "IMAGEGATE_PUBLIC_URL": f"http://{host}:{port}",
    }.items():
        os.environ.setdefault(name, value)
    settings = load_settings()
    models = load_models(settings.providers_file)
    upgrade(settings.database_url)
    key = create_key(make_sessionmaker(make_engine(settings.database_url)), "embedded")

    helpers = [subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--concurrency", "8"]),
               subprocess.Popen([sys.executable, "-m", "app.cli", "sweeper"])]
    model = next(iter(models))
    body = '{"model": "%s", "prompt": "a lighthouse at dusk", "response_format": "b64_json"}' % model
    click.echo(f"\nimagegate is up at {settings.public_url} (data in {data_dir})")
    click.echo(f"API key (shown once): {key}")
    click.echo("Try it:")
    click.echo(f"  curl -s {settings.public_url}/v1/images/generations -H 'Authorization: Bearer {key}' "
               f"-H 'Content-Type: application/json' -d {shlex.quote(body)}\n", nl=True)
    sys.stdout.flush()
    try:
        serve(settings, host=host, port=port, workers=1, connections=1000)
    finally:
        for process in helpers:
            process.terminate()
        for process in helpers:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
