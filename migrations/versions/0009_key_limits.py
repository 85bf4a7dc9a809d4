"""api_keys: per-key limits at intake; an index of each key's unfinished tasks

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-10

Three nullable columns (NULL follows the IMAGEGATE_DEFAULT_* setting, so every existing key keeps
working as before: the defaults are off unless set). The partial index makes counting a key's
pending and running tasks at intake a short index scan; on Postgres it is built CONCURRENTLY,
outside the migration's transaction (see 0005), so intake goes on while a large table is scanned.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

COLUMNS = ("rpm", "images_per_day", "max_pending")
INDEX = "ix_tasks_unfinished_api_key"
UNFINISHED = "status IN ('pending', 'running')"


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        for column in COLUMNS:
            batch.add_column(sa.Column(column, sa.Integer(), nullable=True))
    if op.get_bind().dialect.name != "postgresql":
        op.create_index(INDEX, "tasks", ["api_key_id"], sqlite_where=sa.text(UNFINISHED))
        return
    with op.get_context().autocommit_block():
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
        op.execute(f"CREATE INDEX CONCURRENTLY {INDEX} ON tasks (api_key_id) WHERE {UNFINISHED}")


def downgrade() -> None:
    op.drop_index(INDEX, table_name="tasks")
    with op.batch_alter_table("api_keys") as batch:
        for column in COLUMNS:
            batch.drop_column(column)
