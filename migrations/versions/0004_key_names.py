"""api_keys: live key names are unique; last_used_at

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

A name is unique among live (unrevoked) keys, so `keys revoke NAME` and the other commands taking a
name mean one key, and a revoked key's name can be given again. Live duplicates made before this
revision keep their oldest holder's name; the later ones are renamed NAME-2, NAME-3, ... (the rename
is printed), so that no key stops working.
"""

import logging

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

INDEX = "uq_api_keys_live_name"
LIVE = sa.text("revoked_at IS NULL")
NAME_LENGTH = 200

log = logging.getLogger(__name__)


def _rename_live_duplicates() -> None:
    keys = sa.table("api_keys", sa.column("id"), sa.column("name"), sa.column("created_at"), sa.column("revoked_at"))
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(keys.c.id, keys.c.name).where(keys.c.revoked_at.is_(None)).order_by(keys.c.created_at, keys.c.id)
    ).all()
    taken = {row.name for row in rows}
    kept: set[str] = set()
    for row in rows:
        if row.name not in kept:
            kept.add(row.name)
            continue
        number = 2
        while (new := f"{row.name[: NAME_LENGTH - 8]}-{number}") in taken:
            number += 1
        taken.add(new)
        connection.execute(sa.update(keys).where(keys.c.id == row.id).values(name=new))
        log.warning("api key %r (%s) renamed %r: live key names are now unique", row.name, row.id, new)


def upgrade() -> None:
    _rename_live_duplicates()
    op.add_column("api_keys", sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(INDEX, "api_keys", ["name"], unique=True, postgresql_where=LIVE, sqlite_where=LIVE)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="api_keys")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("last_used_at")
