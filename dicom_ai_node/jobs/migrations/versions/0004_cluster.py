"""cluster: nodes and their heartbeats, one job per key, one delivery per result and
destination, spool paths relative to the data folder

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _relative(path: str) -> str:
    """``.../incoming/<study>/<series>/<sop>.dcm`` -> ``incoming/<study>/<series>/<sop>.dcm``:
    the spool's layout is fixed, so the last four components are the path in any data_dir."""
    parts = path.split("/")
    return "/".join(parts[-4:]) if path.startswith("/") and len(parts) > 4 else path


def _relative_paths(table: str, key: str) -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.text(f"SELECT {key}, path FROM {table}")).all()
    for row_key, path in rows:
        if (new := _relative(path)) != path:
            connection.execute(
                sa.text(f"UPDATE {table} SET path = :path WHERE {key} = :key"),
                {"path": new, "key": row_key},
            )


def _job_keys() -> None:
    """The key of each existing job; jobs duplicating an earlier one keep none."""
    connection = op.get_bind()
    rows = connection.execute(
        sa.text(
            "SELECT id, level, study_instance_uid, series_instance_uid, generation, route "
            "FROM jobs ORDER BY id"
        )
    ).all()
    seen = set()
    for job_id, level, study, series, generation, route in rows:
        key = f"{level}:{series or study}:{generation}:{route or ''}"
        if key in seen:
            continue
        seen.add(key)
        connection.execute(
            sa.text("UPDATE jobs SET unique_key = :key WHERE id = :id"), {"key": key, "id": job_id}
        )


def _dedupe_deliveries() -> None:
    """Deliveries that repeat an earlier one (same result and destination) are dropped."""
    op.execute(
        "DELETE FROM deliveries WHERE id NOT IN "
        "(SELECT MIN(id) FROM deliveries GROUP BY result_uid, destination)"
    )


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("unique_key", sa.String(length=200), nullable=True))
    _job_keys()
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_unique_constraint("uq_jobs_unique_key", ["unique_key"])
    _dedupe_deliveries()
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_unique_constraint(
            "uq_deliveries_result_destination", ["result_uid", "destination"]
        )
    _relative_paths("instances", "sop_instance_uid")
    _relative_paths("results", "sop_instance_uid")


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_constraint("uq_deliveries_result_destination", type_="unique")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("uq_jobs_unique_key", type_="unique")
        batch_op.drop_column("unique_key")
    op.drop_table("nodes")
