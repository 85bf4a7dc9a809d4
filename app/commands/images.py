"""`imagegate images ...`: stored images; `purge` deletes the bytes of old tasks by hand, as the
sweeper does for retention (IMAGEGATE_IMAGE_RETENTION_S), all at once instead of a batch a pass."""

from __future__ import annotations

import re
import sys
from datetime import timedelta

import click

from imagegate.app.commands import cli, load_settings

UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}
DURATION = re.compile(r"\s*([0-9]{1,9})\s*([smhd]?)\s*", re.IGNORECASE)
# Tasks per round: each round deletes from the store, then the rows, in one short transaction.
PURGE_ROUND = 500


def parse_duration(text: str) -> float:
    """Seconds in "7d", "12h", "30m", "45s" or "3600" (seconds)."""
    match = DURATION.fullmatch(text)
    if match is None:
        raise ValueError(
            f"invalid duration {text!r}: expected a whole number with an optional unit, such as 7d, 12h, 30m or 3600"
        )
    return int(match.group(1)) * UNITS[match.group(2).lower()]


@cli.group()
def images() -> None:
    """Stored images."""


@images.command("purge")
@click.option(
    "--older-than", "older_than", required=True, help="Tasks ended longer ago than this: 7d, 12h, 30m, or seconds."
)
def images_purge(older_than: str) -> None:
    """Delete the images of tasks ended longer ago than --older-than (their bytes, in the image store
    too); those tasks then answer `data: []` and `expired: true`. Prints how many were purged."""
    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        raise click.ClickException(f"--older-than: {exc}") from None
    from imagegate.app.db import make_engine
    from imagegate.app.image_store import make_image_store
    from imagegate.app.models import utcnow
    from imagegate.app.settings import SettingsError
    from imagegate.app.stores.images import ImageRecords

    settings = load_settings()
    try:
        store = make_image_store(settings)
    except SettingsError as exc:
        raise click.ClickException(f"configuration: {exc}") from None
    records = ImageRecords(make_engine(settings.database_url, pool_size=1), store)
    cutoff = utcnow() - timedelta(seconds=seconds)
    tasks = images_deleted = 0
    try:
        while True:
            purged = records.expire_ended_before(cutoff, PURGE_ROUND)
            tasks, images_deleted = tasks + purged.tasks, images_deleted + purged.images
            if purged.tasks < PURGE_ROUND:
                break
    except Exception as exc:
        if not _store_error(exc):
            raise
        raise click.ClickException(
            f"the image store failed after {tasks} task(s) were purged: {_first_line(exc)} (run it again to go on)"
        ) from None
    click.echo(f"purged the images of {tasks} task(s): {images_deleted} image(s) deleted")


def _store_error(exc: Exception) -> bool:
    botocore = sys.modules.get("botocore.exceptions")
    return isinstance(exc, OSError) or (
        botocore is not None and isinstance(exc, (botocore.BotoCoreError, botocore.ClientError))
    )


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
