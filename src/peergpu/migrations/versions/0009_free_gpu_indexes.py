"""Partial indexes for the scheduler's free-GPU read: hosts taking jobs in ranking order, and
free GPUs by host

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 19:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TAKING_JOBS = {
    "postgresql": "status = 'online' AND paused IS false AND revoked_at IS NULL"
    " AND price_per_gpu_hour_micros IS NOT NULL",
    "sqlite": "status = 'online' AND paused IS 0 AND revoked_at IS NULL"
    " AND price_per_gpu_hour_micros IS NOT NULL",
}


def upgrade() -> None:
    op.create_index(
        "ix_hosts_ranking",
        "hosts",
        ["price_per_gpu_hour_micros", "reliability", "id"],
        postgresql_where=sa.text(TAKING_JOBS["postgresql"]),
        sqlite_where=sa.text(TAKING_JOBS["sqlite"]),
    )
    op.create_index(
        "ix_host_gpus_free",
        "host_gpus",
        ["host_id", "index"],
        postgresql_where=sa.text("job_id IS NULL"),
        sqlite_where=sa.text("job_id IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_host_gpus_free", table_name="host_gpus")
    op.drop_index("ix_hosts_ranking", table_name="hosts")
