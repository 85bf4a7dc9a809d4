"""The tasks table is analyzed after every 1,000 changes, not after a tenth of its rows

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01

Statements that search tasks by status (the sweeper's, the listings, a key's unfinished count) are
planned on the statistics of `status`. Statistics taken while no task was unfinished estimate the
unfinished at none, and after a burst of new tasks such a plan reads the whole backlog (a claim,
before its guard was rewritten (app/state/guards.py): 10-13 ms with 50,000 pending, against 0.1
ms by primary key; measured). Autovacuum analyzes a table once a tenth of its rows changed, which
for a large tasks table may be never while a backlog comes and goes; with a fixed threshold it is
analyzed in autovacuum's next round (autovacuum_naptime, a minute by default).
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
