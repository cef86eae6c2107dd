"""performed_steps and performed_series (MPPS, PS3.4 Annex F, completes series); pseudonyms
(the map of de-identified exports); requested_routes (studies pulled for a route)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "performed_steps",
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sop_instance_uid"),
    )
    op.create_table(
        "performed_series",
        sa.Column("step_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uids", sa.JSON(), nullable=False),
        sa.Column("completed_generation", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["step_uid"], ["performed_steps.sop_instance_uid"]),
        sa.PrimaryKeyConstraint("step_uid", "series_instance_uid"),
    )
    op.create_index(
        "ix_performed_series_series_instance_uid", "performed_series", ["series_instance_uid"]
    )
    op.create_table(
        "pseudonyms",
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("original", sa.String(length=64), nullable=False),
        sa.Column("pseudonym", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "original"),
        sa.UniqueConstraint("pseudonym"),
    )
    op.create_table(
        "requested_routes",
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("route", sa.String(length=64), nullable=False),
        sa.Column("requested_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("study_instance_uid", "route"),
    )


def downgrade() -> None:
    op.drop_table("requested_routes")
    op.drop_table("pseudonyms")
    op.drop_index("ix_performed_series_series_instance_uid", table_name="performed_series")
    op.drop_table("performed_series")
    op.drop_table("performed_steps")
