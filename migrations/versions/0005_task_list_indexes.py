"""Indexes for listing tasks newest first (the dashboard; a key's own list)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

On Postgres the indexes are built CONCURRENTLY, outside the migration's transaction, so intake and
the workers go on writing while a large tasks table is scanned. A build that fails leaves an
invalid index behind; IF NOT EXISTS would keep it, so it is dropped first and built again.
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

INDEXES = {
    "ix_tasks_api_key_id_created_at_id": ("api_key_id", "created_at", "id"),
    "ix_tasks_created_at_id": ("created_at", "id"),
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        for name, columns in INDEXES.items():
            op.create_index(name, "tasks", list(columns))
        return
    with op.get_context().autocommit_block():
        for name, columns in INDEXES.items():
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            op.execute(f"CREATE INDEX CONCURRENTLY {name} ON tasks ({', '.join(columns)})")


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="tasks")
