"""host_served_models

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 18:01:20.023886
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "host_served_models",
        sa.Column("host_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("max_concurrency", sa.Integer(), nullable=False),
        sa.Column("input_price_per_million_micros", sa.BigInteger(), nullable=False),
        sa.Column("output_price_per_million_micros", sa.BigInteger(), nullable=False),
        sa.Column("declared_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["host_id"],
            ["hosts.id"],
            name=op.f("fk_host_served_models_host_id_hosts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("host_id", "name", name=op.f("pk_host_served_models")),
    )


def downgrade() -> None:
    op.drop_table("host_served_models")
