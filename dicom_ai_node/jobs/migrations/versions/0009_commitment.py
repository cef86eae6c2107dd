"""deliveries: Storage Commitment (transaction_uid, commitment_requested_at, committed_at)

Revision ID: 0009
Revises: 0008 (governance)
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("transaction_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("commitment_requested_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("committed_at", sa.DateTime(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_deliveries_transaction_uid"), ["transaction_uid"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deliveries_transaction_uid"))
        batch_op.drop_column("committed_at")
        batch_op.drop_column("commitment_requested_at")
        batch_op.drop_column("transaction_uid")
