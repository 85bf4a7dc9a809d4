"""CHECK constraints: each status column holds only its machine's statuses (app/state/*)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

On Postgres each constraint is added NOT VALID (a brief lock, no scan) and then validated after
that commits: VALIDATE CONSTRAINT scans the table under a lock that lets reads and writes go on,
so a large tasks table is not locked for the length of a scan. A failed validation (a row outside
the enum) leaves the migration at 0001 with the constraint unvalidated; running it again starts
over. SQLite cannot add a constraint to a table, so there the table is copied (batch mode): the
embedded database is small.

The statuses are written out here, not imported: a migration must keep meaning what it meant when
it ran. tests/state/test_statuses.py checks that the enums still match the database.
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

STATUSES = {
    "tasks": ("pending", "running", "succeed", "failed"),
    "batches": ("in_progress", "cancelling", "completed", "cancelled"),
    "webhook_events": ("pending", "sending", "delivered", "failed", "disabled"),
}


def _name(table: str) -> str:
    return f"ck_{table}_status"


def _condition(statuses: tuple[str, ...]) -> str:
    return "status IN (" + ", ".join(f"'{status}'" for status in statuses) + ")"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        for table, statuses in STATUSES.items():
            with op.batch_alter_table(table) as batch:
                batch.create_check_constraint(_name(table), _condition(statuses))
        return
    # Rather fail than queue behind a long transaction while every write to these tables waits on us.
    op.execute("SET LOCAL lock_timeout = '10s'")
    for table, statuses in STATUSES.items():
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {_name(table)}")
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {_name(table)} CHECK ({_condition(statuses)}) NOT VALID")
    with op.get_context().autocommit_block():
        for table in STATUSES:
            op.execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {_name(table)}")


def downgrade() -> None:
    for table in STATUSES:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(_name(table), type_="check")
