"""`imagegate` subcommands. Each one imports only what its process needs: `api` never loads
worker code, `worker` never loads Flask."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from imagegate.app.logs import configure_logging
from imagegate.app.settings import Settings, SettingsError


def imagegate_command() -> list[str]:
    """How to start another `imagegate` process: the console script installed beside this Python.
    Never `python -m ...`, which puts the working directory first on the path, so that a directory
    holding a package of the same name (any project's `app/`) would be imported instead of ours."""
    script = Path(sys.executable).with_name("imagegate")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from imagegate.app.cli import main; main()"]


def load_settings(**overrides) -> Settings:
    try:
        return Settings(**overrides).check()
    except (SettingsError, ValidationError) as exc:
        raise click.ClickException(f"configuration: {exc}") from None


def _providers_guard(func):
    """Show a bad providers file as one clear line, not a traceback."""
    from functools import wraps

    from imagegate.app.providers import ProvidersFileError

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ProvidersFileError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


class Commands(click.Group):
    """Turns an ordinary failure (no schema yet, a database or broker that does not answer) into one
    line and a non-zero exit instead of a traceback."""

    def invoke(self, ctx: click.Context):
        from imagegate.app.command_errors import explain

        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            message = explain(exc)
            if message is None:
                raise
            raise click.ClickException(message) from None


@click.group(cls=Commands)
@click.version_option(package_name="imagegate", prog_name="imagegate")
def cli() -> None:
    """imagegate: OpenAI-compatible image generation as durable jobs."""
    try:
        settings = Settings()
    except ValidationError:  # the command that needs the settings says what is wrong with them
        settings = Settings.model_construct()
    configure_logging(settings, "cli")


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to the newest schema (Alembic head)."""
    from imagegate.app.migrate import upgrade

    upgrade(load_settings().database_url)
    click.echo("database is at head")


@cli.group()
def keys() -> None:
    """API keys."""


def _key_sessions():
    from imagegate.app.db import make_engine, make_sessionmaker

    return make_sessionmaker(make_engine(load_settings().database_url, pool_size=1))


def _checked_callback(url: str | None) -> str | None:
    from imagegate.app.ssrf import UnsafeUrl, resolve_public

    if url:
        try:
            resolve_public(url, allow_private=load_settings().webhook_allow_private)
        except UnsafeUrl as exc:
            raise click.BadParameter(str(exc), param_hint="--callback-url") from None
    return url


@keys.command("create")
@click.option("--name", required=True, help="What the key is for; unique among live keys.")
@click.option("--callback-url", default=None, help="Default webhook URL for this key's tasks and batches.")
def keys_create(name: str, callback_url: str | None) -> None:
    """Create an API key; the key is printed once, alone on the last line."""
    from imagegate.app.keys import KeyNameTaken, create_key

    try:
        created = create_key(_key_sessions(), name, _checked_callback(callback_url))
    except KeyNameTaken:
        raise click.ClickException(f"a live key is already named {name!r}: choose another --name") from None
    click.echo(f"Webhook signing secret (verify webhook-signature with it): {created.webhook_secret}")
    click.echo(f"Created API key {name!r}. It is shown only now; store it:")
    click.echo(created.key)


@keys.command("list")
def keys_list() -> None:
    """Every key: name, prefix, created, last used, revoked (never the key or its secret)."""
    from imagegate.app.keys import list_keys

    _print_keys(list_keys(_key_sessions()))


def _print_keys(listing) -> None:
    """A table on a terminal; tab-separated lines (a header first) for a pipe or a file."""
    from rich.console import Console
    from rich.table import Table

    def when(moment) -> str:
        return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"

    header = ("name", "prefix", "created", "last used", "revoked")
    rows = [(k.name, k.prefix, when(k.created_at), when(k.last_used_at), when(k.revoked_at)) for k in listing]
    console = Console()
    if not console.is_terminal:
        for row in (header, *rows):
            click.echo("\t".join(row))
        return
    table = Table(*header)
    for row in rows:
        table.add_row(*row, style="dim" if row[-1] != "-" else None)
    console.print(table)


@keys.command("revoke")
@click.argument("name")
def keys_revoke(name: str) -> None:
    """Revoke the live key named NAME. Each API process refuses it within IMAGEGATE_KEY_CACHE_TTL_S."""
    from imagegate.app.keys import revoke_key

    if not revoke_key(_key_sessions(), name):
        raise click.ClickException(f"no live key named {name!r} (see `imagegate keys list`)")
    click.echo(f"revoked {name!r}")


@keys.command("rotate-webhook-secret")
@click.option("--name", required=True, help="The key's name.")
@click.option("--overlap-s", default=86400.0, show_default=True, help="How long the previous secret keeps signing too.")
def keys_rotate_webhook_secret(name: str, overlap_s: float) -> None:
    """Give the key a new webhook signing secret; both sign during the overlap."""
    from imagegate.app.keys import rotate_webhook_secret

    secret = rotate_webhook_secret(_key_sessions(), name, overlap_s)
    if secret is None:
        raise click.ClickException(f"no live key named {name!r}")
    click.echo(secret)


@keys.command("set-callback")
@click.option("--name", required=True, help="The key's name.")
@click.option("--url", default=None, help="The default callback URL; omit to remove it.")
def keys_set_callback(name: str, url: str | None) -> None:
    """Set (or remove) the key's default webhook URL."""
    from imagegate.app.keys import set_callback_url

    if not set_callback_url(_key_sessions(), name, _checked_callback(url)):
        raise click.ClickException(f"no live key named {name!r}")


def _metrics_option(port: int):
    return click.option(
        "--metrics-port",
        type=int,
        default=None,
        help=f"Serve Prometheus metrics on this port (all interfaces), e.g. {port}; off by default.",
    )


def _serve_metrics(port: int, collectors=()) -> None:
    from imagegate.app.metrics import serve_metrics

    try:
        serve_metrics(port, collectors=collectors)
    except OSError as exc:
        raise click.ClickException(
            f"cannot serve metrics on port {port} ({exc.strerror or exc}); choose another --metrics-port"
        ) from None


def _private_metrics_dir() -> str | None:
    """gunicorn's workers are processes: prometheus-client's multiprocess mode has each write its
    metrics to files in PROMETHEUS_MULTIPROC_DIR, summed by /metrics. It must be set before
    prometheus_client is first imported. When unset, a private one is made: returned for the caller
    to remove at exit."""
    import tempfile

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path = tempfile.mkdtemp(prefix="imagegate-metrics-")
    return path


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=int, help="gunicorn worker processes.")
@click.option(
    "--connections",
    default=4000,
    show_default=True,
    type=int,
    help="Concurrent connections per process (greenlets); one client address may hold "
    "IMAGEGATE_MAX_REQUESTS_PER_CLIENT of them.",
)
@_providers_guard
def api(host: str, port: int, workers: int, connections: int) -> None:
    """Serve the intake API with gunicorn (gevent workers)."""
    from imagegate.app.providers import load_models

    settings = load_settings()
    configure_logging(settings, "api")
    load_models(settings.providers_file)  # fail here, once, with a clear message
    made = _private_metrics_dir()
    try:
        from imagegate.app.web.server import serve  # imports prometheus_client: after the line above

        serve(settings, host=host, port=port, workers=workers, connections=connections)
    finally:
        if made:
            import shutil

            shutil.rmtree(made, ignore_errors=True)


@cli.command()
@click.option(
    "--pool", "-P", default="gevent", show_default=True, type=click.Choice(["gevent", "threads", "prefork", "solo"])
)
@click.option(
    "--concurrency", "-c", default=1000, show_default=True, type=int, help="Tasks in flight per worker process."
)
@click.option("--loglevel", "-l", default=None, help="Log level (default: IMAGEGATE_LOG_LEVEL, INFO).")
@click.option("--hostname", "-n", default=None, help="Worker name (default: imagegate-PID@HOST).")
@_metrics_option(9101)
@_providers_guard
def worker(pool: str, concurrency: int, loglevel: str, hostname: str | None, metrics_port: int | None) -> None:
    """Run a Celery worker (an I/O-bound pool keeps many upstream calls in flight)."""
    from imagegate.app.os_limits import allow_open_files
    from imagegate.app.queue import WORKER_QUEUES
    from imagegate.workers.celery_app import make_worker_app

    # A socket per call in flight (and per download), plus the database and broker pools.
    allow_open_files(2 * concurrency + 256)
    settings = load_settings()
    json_lines = configure_logging(settings, "worker")
    celery = make_worker_app(settings, concurrency=concurrency)
    if metrics_port is not None:
        _serve_metrics(metrics_port)
    celery.worker_main(
        [
            *(["--quiet"] if json_lines else []),  # Celery's banner is text, not a log event
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--loglevel={loglevel or settings.log_level}",
            f"--queues={','.join(WORKER_QUEUES)}",
            f"--hostname={hostname or f'imagegate-{os.getpid()}@%h'}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


@cli.command()
@click.option("--once", is_flag=True, help="One pass, then exit (for cron or a test).")
@_metrics_option(9102)
def sweeper(once: bool, metrics_port: int | None) -> None:
    """Find and resend what the broker lost: overdue pending tasks, expired leases, deadlines.
    Safe to run on several hosts at once."""
    import signal
    import threading

    from imagegate.app.sweeper import make_sweeper

    settings = load_settings()
    configure_logging(settings, "sweeper")
    sweep = make_sweeper(settings)
    if once:
        if settings.uses_redis:  # a pass that cannot publish is no pass: say so, in one line
            import redis

            redis.Redis.from_url(settings.broker_url, socket_connect_timeout=3, socket_timeout=3).ping()
        click.echo(str(sweep.sweep_once()))
        return
    if metrics_port is not None:
        from imagegate.app.metrics import BacklogCollector

        _serve_metrics(metrics_port, [BacklogCollector(sweep.runtime.engine, sweep.broker)])
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    sweep.run(stop)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen here; 0.0.0.0 serves the network.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--data-dir", default="imagegate-data", show_default=True, type=click.Path(file_okay=False, path_type=Path)
)
@click.option("--new-key", is_flag=True, help="Revoke the key of the last run and make a new one.")
@click.option("--verbose", is_flag=True, help="Show the API's, worker's and sweeper's output here, not in DATA/logs.")
@_providers_guard
def up(host: str, port: int, data_dir: Path, new_key: bool, verbose: bool) -> None:
    """Everything on one machine with no servers: SQLite file, filesystem broker, API, worker, sweeper."""
    if not verbose:  # keep the banner on screen: migrations log nothing, helpers log to files
        logging.getLogger().setLevel(logging.WARNING)
    import signal

    from imagegate.app import embedded
    from imagegate.app.db import make_engine, make_sessionmaker
    from imagegate.app.migrate import upgrade
    from imagegate.app.providers import load_models

    try:
        embedded.check_port(host, port)
    except embedded.UpError as exc:
        raise click.ClickException(str(exc)) from None
    data_dir = data_dir.resolve()
    (data_dir / "broker").mkdir(parents=True, exist_ok=True)
    # Explicit IMAGEGATE_* variables win; the rest is the embedded default.
    for name, value in {
        "IMAGEGATE_EMBEDDED": "1",
        "IMAGEGATE_DATA_DIR": str(data_dir),
        "IMAGEGATE_DATABASE_URL": f"sqlite:///{data_dir / 'imagegate.db'}",
        "IMAGEGATE_BROKER_URL": "filesystem://",
        "IMAGEGATE_SECRET_KEY": embedded.secret_key(data_dir),
        "IMAGEGATE_PUBLIC_URL": embedded.public_url(host, port),
    }.items():
        os.environ.setdefault(name, value)
    settings = load_settings()
    models = load_models(settings.providers_file)
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    key, reused = embedded.api_key(make_sessionmaker(engine), data_dir, new_key)

    signal.signal(signal.SIGTERM, _interrupt)  # ends `up` as Ctrl-C does: its processes stopped, exit 0
    helpers = embedded.start_helpers(imagegate_command(), host, port, data_dir, verbose)
    try:
        local = embedded.public_url("127.0.0.1" if host in ("0.0.0.0", "") else host, port)
        embedded.wait_until_ready(helpers, local, engine)
        _print_banner(settings.public_url, next(iter(models)), key, reused, data_dir, verbose)
        embedded.watch(helpers)
    except embedded.UpError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass
    finally:
        embedded.stop(helpers)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _print_banner(url: str, model: str, key: str, reused: bool, data_dir: Path, verbose: bool) -> None:
    body = '{"model": "%s", "prompt": "a lighthouse at dusk", "response_format": "b64_json"}' % model
    kept = "kept from the last run; --new-key makes a new one" if reused else f"new; kept in {data_dir / 'api_key'}"
    click.echo(f"\nimagegate is up at {url} (data in {data_dir})")
    click.echo(f"API key ({kept}):\n  {key}")
    click.echo("Try it:")
    click.echo(
        f"  curl -s {url}/v1/images/generations -H 'Authorization: Bearer {key}' "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )
    if not verbose:
        click.echo(f"Logs in {data_dir / 'logs'} (--verbose shows them here).")
    click.echo("Ctrl-C stops everything.\n")
    sys.stdout.flush()


@cli.group()
def batch() -> None:
    """Submit a JSONL file of image requests as batches, follow them, download the images.
    An HTTP client of a running server (see client/batch.py)."""


@batch.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--url", required=True, envvar="IMAGEGATE_URL", show_envvar=True, help="The server's base URL.")
@click.option("--key", required=True, envvar="IMAGEGATE_KEY", show_envvar=True, help="An API key.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where images and the resume state (.imagegate-batch.json) go.",
)
@click.option("--wait", is_flag=True, help="Follow the batches and download every image; exit 1 if any failed.")
@click.option("--chunk-size", default=5000, show_default=True, type=click.IntRange(1, 10000), help="Lines per batch.")
def batch_submit(file: Path, url: str, key: str, out: Path, wait: bool, chunk_size: int) -> None:
    """Submit FILE (JSONL: {"custom_id", "body"} per line, or OpenAI Batch API lines).
    Running the same command again resumes and never submits anything twice."""
    from imagegate.client.batch import submit

    sys.exit(submit(file, url, key, out, wait, chunk_size))


@batch.command("status")
@click.argument("batch_id")
@click.option("--url", required=True, envvar="IMAGEGATE_URL", show_envvar=True, help="The server's base URL.")
@click.option("--key", required=True, envvar="IMAGEGATE_KEY", show_envvar=True, help="An API key.")
@click.option("--json", "as_json", is_flag=True, help="Print the batch object as JSON.")
def batch_status(batch_id: str, url: str, key: str, as_json: bool) -> None:
    """Show a batch's progress."""
    from imagegate.client.batch import status

    sys.exit(status(batch_id, url, key, as_json))


@batch.command("results")
@click.argument("batch_id")
@click.option("--url", required=True, envvar="IMAGEGATE_URL", show_envvar=True, help="The server's base URL.")
@click.option("--key", required=True, envvar="IMAGEGATE_KEY", show_envvar=True, help="An API key.")
def batch_results(batch_id: str, url: str, key: str) -> None:
    """Print a batch's results JSONL (one line per request, in file order)."""
    from imagegate.client.batch import results

    sys.exit(results(batch_id, url, key))
