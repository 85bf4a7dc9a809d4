"""Image bytes in an image store, and their retention

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

images.data becomes nullable and images.store_key names the bytes kept in a directory or a bucket
(IMAGEGATE_IMAGE_STORE); tasks.images_expired_at marks a task whose bytes retention deleted. Adding
nullable columns and dropping a NOT NULL are catalogue changes on Postgres, no table rewrite.

The retention sweep's partial index is built CONCURRENTLY on Postgres, outside the migration's
transaction, so intake and the workers go on writing while a large tasks table is scanned (as in
0005: an invalid index a failed build left behind is dropped first).
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

INDEX = "ix_tasks_finished_at_images_kept"
WHERE = "images_expired_at IS NULL AND finished_at IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("images") as images:
        images.alter_column("data", existing_type=sa.LargeBinary(), nullable=True)
        images.add_column(sa.Column("store_key", sa.String(300), nullable=True))
    with op.batch_alter_table("tasks") as tasks:
        tasks.add_column(sa.Column("images_expired_at", sa.DateTime(timezone=True), nullable=True))
    if op.get_bind().dialect.name != "postgresql":
        op.create_index(INDEX, "tasks", ["finished_at"], sqlite_where=sa.text(WHERE))
        return
    with op.get_context().autocommit_block():
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
        op.execute(f"CREATE INDEX CONCURRENTLY {INDEX} ON tasks (finished_at) WHERE {WHERE}")


def downgrade() -> None:
    op.drop_index(INDEX, table_name="tasks")
    with op.batch_alter_table("tasks") as tasks:
        tasks.drop_column("images_expired_at")
    with op.batch_alter_table("images") as images:
        images.drop_column("store_key")
        images.alter_column("data", existing_type=sa.LargeBinary(), nullable=False)
