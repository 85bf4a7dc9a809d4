"""tasks.queued_reason: why a pending task waits on its model's upstream limits

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08

A nullable column without a default is added without rewriting the table on Postgres. Its CHECK
constraint is added NOT VALID and validated after that commits (as in 0002), so a large tasks table
is not locked for a scan. SQLite copies the table (batch mode): the embedded database is small.

The reasons are written out here, not imported: a migration must keep meaning what it meant when
it ran. tests/state/test_model_waits.py checks that the enum still matches the database.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

REASONS = ("model_concurrency_limit", "model_rate_limit")
CONSTRAINT = "ck_tasks_queued_reason"
CONDITION = "queued_reason IS NULL OR queued_reason IN (" + ", ".join(f"'{reason}'" for reason in REASONS) + ")"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table("tasks") as batch:
            batch.add_column(sa.Column("queued_reason", sa.String(32), nullable=True))
            batch.create_check_constraint(CONSTRAINT, CONDITION)
        return
    op.execute("SET LOCAL lock_timeout = '10s'")
    op.add_column("tasks", sa.Column("queued_reason", sa.String(32), nullable=True))
    op.execute(f"ALTER TABLE tasks ADD CONSTRAINT {CONSTRAINT} CHECK ({CONDITION}) NOT VALID")
    with op.get_context().autocommit_block():
        op.execute(f"ALTER TABLE tasks VALIDATE CONSTRAINT {CONSTRAINT}")


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_constraint(CONSTRAINT, type_="check")
        batch.drop_column("queued_reason")
