"""tasks.deleted (DELETE /v1/images/{id}); api_keys.models (a key limited to some models)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10

Both columns are added without rewriting the table on Postgres 11+: `deleted` has a constant
default, `models` is nullable (NULL: every model).
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("deleted", sa.Boolean(), nullable=False, server_default=sa.text("false")))
    op.add_column("api_keys", sa.Column("models", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("models")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("deleted")
