"""The tasks table is analyzed after every 1,000 changes, not after a tenth of its rows

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01

A claim addresses its tasks by id and guards their status (`WHERE id = … AND status = 'pending'`).
When the statistics were taken while no task was unfinished, Postgres estimates the unfinished
tasks at none and plans the claim as a scan of them (a status index, or the partial index of a
key's unfinished tasks) instead of a lookup by primary key. After a burst of new tasks every claim
then read the whole backlog: 10-13 ms for one claim with 50,000 pending, against 0.1 ms by the
primary key (measured). Autovacuum analyzes a table once a tenth of its rows changed, which for a
large tasks table may be never while a backlog comes and goes; with a fixed threshold it is analyzed
in autovacuum's next round (autovacuum_naptime, a minute by default). Until then, the scan it is.
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("SET LOCAL lock_timeout = '10s'")
    op.execute("ALTER TABLE tasks SET (autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 1000)")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("SET LOCAL lock_timeout = '10s'")
    op.execute("ALTER TABLE tasks RESET (autovacuum_analyze_scale_factor, autovacuum_analyze_threshold)")
