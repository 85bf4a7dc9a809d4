"""`imagegate keys ...`: create, list, revoke and configure API keys."""

from __future__ import annotations

import click

from imagegate.app.commands import cli, load_settings


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


MODELS_HELP = "Comma-separated models the key may use (others are 404 for it); default: every model."


def _checked_models(text: str | None) -> list[str] | None:
    """The names of --models; each must be a model of the providers file when one is configured
    (without one, the file the API serves is not known here)."""
    if text is None:
        return None
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise click.ClickException("--models: name at least one model (or use --all-models)")
    settings = load_settings()
    if settings.providers_file is not None:
        from imagegate.app.providers import ProvidersFileError, load_models

        try:
            served = load_models(settings.providers_file)
        except ProvidersFileError as exc:
            raise click.ClickException(str(exc)) from None
        unknown = [name for name in names if name not in served]
        if unknown:
            raise click.ClickException(
                f"--models: {unknown[0]!r} is not a model of {settings.providers_file} (models: {', '.join(served)})"
            )
    return names


@keys.command("create")
@click.option("--name", required=True, help="What the key is for; unique among live keys.")
@click.option("--callback-url", default=None, help="Default webhook URL for this key's tasks and batches.")
@click.option("--models", "models", default=None, help=MODELS_HELP)
def keys_create(name: str, callback_url: str | None, models: str | None) -> None:
    """Create an API key; the key is printed once, alone on the last line."""
    from imagegate.app.keys import KeyNameTaken, create_key

    try:
        created = create_key(_key_sessions(), name, _checked_callback(callback_url), _checked_models(models))
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


@keys.command("update")
@click.option("--name", required=True, help="The key's name.")
@click.option("--models", "models", default=None, help=MODELS_HELP)
@click.option("--all-models", is_flag=True, help="Let the key use every model again.")
def keys_update(name: str, models: str | None, all_models: bool) -> None:
    """Change a live key's settings; what is not given stays. API processes apply a change within
    IMAGEGATE_KEY_CACHE_TTL_S."""
    from imagegate.app.keys import set_models

    if models is not None and all_models:
        raise click.UsageError("give --models or --all-models, not both")
    if models is None and not all_models:
        raise click.UsageError("nothing to change: give --models or --all-models")
    sessions = _key_sessions()
    if not set_models(sessions, name, None if all_models else _checked_models(models)):
        raise click.ClickException(f"no live key named {name!r} (see `imagegate keys list`)")
    click.echo(f"updated {name!r}")
