"""The long-running processes: `imagegate api`, `worker`, `sweeper` and `up` (all of them on one machine)."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from imagegate.app.commands import _providers_guard, cli, imagegate_command, load_settings
from imagegate.app.logs import configure_logging


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


@contextmanager
def _multiprocess_metrics() -> Iterator[None]:
    """For a command whose work is done by processes it starts (gunicorn's workers, a group of worker
    processes): prometheus-client's multiprocess mode has each write its metrics to files in
    PROMETHEUS_MULTIPROC_DIR, summed when scraped. It must be set before prometheus_client is first
    imported. When unset, a private one is made, and removed at the end."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    import shutil
    import tempfile

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path = tempfile.mkdtemp(prefix="imagegate-metrics-")
    try:
        yield
    finally:
        shutil.rmtree(path, ignore_errors=True)


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
    with _multiprocess_metrics():
        from imagegate.app.web.server import serve  # imports prometheus_client: after the line above

        serve(settings, host=host, port=port, workers=workers, connections=connections)


@cli.command()
@click.option(
    "--pool", "-P", default="gevent", show_default=True, type=click.Choice(["gevent", "threads", "prefork", "solo"])
)
@click.option(
    "--concurrency", "-c", default=1000, show_default=True, type=int, help="Tasks in flight per worker process."
)
@click.option(
    "--processes",
    default=None,
    type=click.IntRange(min=0),
    help="Worker processes on this host, each with --concurrency slots "
    "(default: IMAGEGATE_WORKER_PROCESSES; 0, its default: one per CPU core).",
)
@click.option("--loglevel", "-l", default=None, help="Log level (default: IMAGEGATE_LOG_LEVEL, INFO).")
@click.option("--hostname", "-n", default=None, help="Worker name (default: imagegate-PID@HOST).")
@_metrics_option(9101)
@_providers_guard
def worker(
    pool: str, concurrency: int, processes: int | None, loglevel: str, hostname: str | None, metrics_port: int | None
) -> None:
    """Run Celery workers (an I/O-bound pool keeps many upstream calls in flight). With several
    processes, process i is named NAME-i, and --metrics-port serves their metrics summed."""
    from imagegate.app.os_limits import worker_processes

    settings = load_settings()
    json_lines = configure_logging(settings, "worker")
    processes = worker_processes(processes, settings.worker_processes)
    if processes > 1:
        from imagegate.app.providers import load_models

        load_models(settings.providers_file)  # a bad file fails here, once, not in every child
        sys.exit(_run_worker_group(processes, pool, concurrency, loglevel, hostname, metrics_port))

    from imagegate.app.os_limits import allow_open_files
    from imagegate.app.queue import WORKER_QUEUES
    from imagegate.workers.celery_app import make_worker_app

    # A socket per call in flight (and per download), plus the database and broker pools.
    allow_open_files(2 * concurrency + 256)
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


def _run_worker_group(
    processes: int, pool: str, concurrency: int, loglevel: str | None, hostname: str | None, metrics_port: int | None
) -> int:
    """The group's parent (app/commands/worker_group.py). With --metrics-port its metrics are the
    children's summed: they write them to files in PROMETHEUS_MULTIPROC_DIR and the parent alone
    serves the port. Without it nobody reads them, so the children keep them in memory as usual."""
    from imagegate.app.commands.worker_group import run_group

    commands = [_worker_child(index, pool, concurrency, loglevel, hostname) for index in range(processes)]
    if metrics_port is None:
        return run_group(commands)
    with _multiprocess_metrics():
        from prometheus_client import multiprocess

        _serve_metrics(metrics_port)
        # A child that ended: its live gauges (calls in flight) no longer count.
        return run_group(commands, multiprocess.mark_process_dead)


def _worker_child(index: int, pool: str, concurrency: int, loglevel: str | None, hostname: str | None) -> list[str]:
    """The command of worker process `index` of a group: one process, its own name."""
    name = None
    if hostname:
        node, at, host = hostname.partition("@")
        name = f"{node}-{index}{at}{host}"
    return [
        *imagegate_command(),
        "worker",
        "--processes=1",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        *([f"--loglevel={loglevel}"] if loglevel else []),
        *([f"--hostname={name}"] if name else []),
    ]


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
        if sweep.broker is not None:  # a pass that cannot publish is no pass: say so, in one line
            sweep.broker.ping()
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
