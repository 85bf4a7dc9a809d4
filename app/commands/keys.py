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


class LimitValue(click.ParamType):
    """A per-key limit: a whole number (0: no limit), or `default` to follow IMAGEGATE_DEFAULT_*."""

    name = "limit"

    def get_metavar(self, param, ctx=None) -> str:
        return "N|default"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == DEFAULT:
            return value
        try:
            number = int(str(value).strip())
        except ValueError:
            number = -1
        if number < 0:  # one line, as every other mistake (a UsageError would print the usage too)
            flag = param.opts[0] if param else "the limit"
            raise click.ClickException(f"{flag}: {value!r} is not a whole number >= 0 or 'default'")
        return number


DEFAULT = "default"
LIMIT_OPTIONS = (  # (flag, help): each sets the api_keys column named like the flag
    ("--rpm", "Requests per minute (a batch counts its lines); IMAGEGATE_DEFAULT_RPM by default."),
    ("--images-per-day", "Images per day (each request's n); IMAGEGATE_DEFAULT_IMAGES_PER_DAY by default."),
    ("--max-pending", "Tasks pending or running at once; IMAGEGATE_DEFAULT_MAX_PENDING by default."),
)


def limit_options(command):
    for flag, help_text in reversed(LIMIT_OPTIONS):
        command = click.option(flag, type=LimitValue(), default=None, help=f"{help_text} 0: no limit.")(command)
    return command


@keys.command("create")
@click.option("--name", required=True, help="What the key is for; unique among live keys.")
@click.option("--callback-url", default=None, help="Default webhook URL for this key's tasks and batches.")
@click.option("--models", "models", default=None, help=MODELS_HELP)
@limit_options
def keys_create(
    name: str,
    callback_url: str | None,
    models: str | None,
    rpm: int | None,
    images_per_day: int | None,
    max_pending: int | None,
) -> None:
    """Create an API key; the key is printed once, alone on the last line."""
    from imagegate.app.key_limits import StoredLimits
    from imagegate.app.keys import KeyNameTaken, create_key

    given = [None if value == DEFAULT else value for value in (rpm, images_per_day, max_pending)]
    try:
        created = create_key(
            _key_sessions(),
            name,
            _checked_callback(callback_url),
            StoredLimits(*given),
            models=_checked_models(models),
        )
    except KeyNameTaken:
        raise click.ClickException(f"a live key is already named {name!r}: choose another --name") from None
    click.echo(f"Webhook signing secret (verify webhook-signature with it): {created.webhook_secret}")
    click.echo(f"Created API key {name!r}. It is shown only now; store it:")
    click.echo(created.key)


@keys.command("update")
@click.option("--name", required=True, help="The key's name.")
@click.option("--models", "models", default=None, help=MODELS_HELP)
@click.option("--all-models", is_flag=True, help="Let the key use every model again.")
@limit_options
def keys_update(
    name: str,
    models: str | None,
    all_models: bool,
    rpm: int | str | None,
    images_per_day: int | str | None,
    max_pending: int | str | None,
):
    """Change a live key's limits or models: each flag given is set (`default` follows the setting
    again), the others stay. Each API process applies them within IMAGEGATE_KEY_CACHE_TTL_S."""
    from imagegate.app.keys import update_key

    if models is not None and all_models:
        raise click.UsageError("give --models or --all-models, not both")
    given = {"rpm": rpm, "images_per_day": images_per_day, "max_pending": max_pending}
    changes = {column: None if value == DEFAULT else value for column, value in given.items() if value is not None}
    if models is not None or all_models:
        changes["models"] = None if all_models else _checked_models(models)
    if not changes:
        raise click.ClickException(
            "nothing to update: give --models, --all-models, --rpm, --images-per-day or --max-pending"
        )
    if not update_key(_key_sessions(), name, **changes):
        raise click.ClickException(f"no live key named {name!r} (see `imagegate keys list`)")
    click.echo(f"updated {name!r}")


@keys.command("list")
def keys_list() -> None:
    """Every key: name, prefix, created, last used, revoked, and its limits (never the key or its secret)."""
    from imagegate.app.key_limits import KeyLimits
    from imagegate.app.keys import list_keys

    _print_keys(list_keys(_key_sessions()), KeyLimits.defaults(load_settings()))


def _shown_limit(own: int | None, default: int) -> str:
    """A key's own limit, or `default (N)`; 0 is `unlimited`."""
    if own is None:
        return f"default ({default or 'unlimited'})"
    return str(own) if own else "unlimited"


def _print_keys(listing, defaults) -> None:
    """A table on a terminal; tab-separated lines (a header first) for a pipe or a file."""
    from rich.console import Console
    from rich.table import Table

    def when(moment) -> str:
        return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"

    header = ("name", "prefix", "created", "last used", "revoked", "rpm", "images/day", "max pending")
    rows = [
        (
            k.name,
            k.prefix,
            when(k.created_at),
            when(k.last_used_at),
            when(k.revoked_at),
            _shown_limit(k.limits.rpm, defaults.rpm),
            _shown_limit(k.limits.images_per_day, defaults.images_per_day),
            _shown_limit(k.limits.max_pending, defaults.max_pending),
        )
        for k in listing
    ]
    console = Console()
    if not console.is_terminal:
        for row in (header, *rows):
            click.echo("\t".join(row))
        return
    table = Table(*header)
    for row in rows:
        table.add_row(*row, style="dim" if row[4] != "-" else None)
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
