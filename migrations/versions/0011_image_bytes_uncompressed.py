"""Image bytes are stored without Postgres's compression (STORAGE EXTERNAL)

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30

PNG, JPEG and WebP are compressed already, but a PNG's header repeats bytes early enough that
Postgres's pglz does not give up at once: it worked through most of each image before finding it
would not shrink. That was ~2 of the ~2.6 ms of Postgres CPU spent writing a 150 KB image (measured).
Only the catalog changes: rows stored before keep their form, new ones are stored as sent. SQLite
(the embedded mode) never compresses.
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

COLUMNS = (("images", "data"), ("task_inputs", "data"))


def _set_storage(storage: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("SET LOCAL lock_timeout = '10s'")
    for table, column in COLUMNS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET STORAGE {storage}")


def upgrade() -> None:
    _set_storage("EXTERNAL")


def downgrade() -> None:
    _set_storage("EXTENDED")
