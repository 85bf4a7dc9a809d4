"""`imagegate` subcommands. Each one imports only what its process needs: `api` never loads
worker code, `worker` never loads Flask."""

from __future__ import annotations

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


# Each module adds its commands to `cli` (keys, serving processes, batches, images); imported last, as they use it.
from imagegate.app.commands import batch, images, keys, serve  # noqa: E402, F401
