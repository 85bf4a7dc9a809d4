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
