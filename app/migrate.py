"""Alembic, driven from code: `imagegate db upgrade` and the tests use the same config."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from imagegate import migrations


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)
