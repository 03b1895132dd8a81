"""jobs: index for the scheduler's bounded, fair-share queue read

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 15:40:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_jobs_fair_queue",
        "jobs",
        ["state", "owner_id", "priority", "created_at", "id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_fair_queue", table_name="jobs")
