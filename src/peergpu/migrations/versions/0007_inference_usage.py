"""inference_usage: one row per gateway request, billed per token through the ledger

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24 10:12:00.000000
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
        "inference_usage",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("api_key_id", sa.Uuid(), nullable=True),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=True),
        sa.Column("wallet", sa.String(length=48), nullable=False),
        sa.Column("host_id", sa.Uuid(), nullable=False),
        sa.Column("host_owner_id", sa.Uuid(), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("endpoint", sa.String(length=32), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("input_price_per_million_micros", sa.BigInteger(), nullable=False),
        sa.Column("output_price_per_million_micros", sa.BigInteger(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
        sa.Column("first_token_ms", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("billed_transaction_key", sa.String(length=200), nullable=True),
        sa.Column("billed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inference_usage")),
    )
    with op.batch_alter_table("inference_usage", schema=None) as batch_op:
        batch_op.create_index(
            "ix_inference_usage_unbilled",
            ["created_at"],
            unique=False,
            postgresql_where=sa.text("billed_at IS NULL"),
            sqlite_where=sa.text("billed_at IS NULL"),
        )
        batch_op.create_index(
            "ix_inference_usage_wallet_created", ["wallet", "created_at"], unique=False
        )
        batch_op.create_index(
            "ix_inference_usage_key_created", ["api_key_id", "created_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("inference_usage", schema=None) as batch_op:
        batch_op.drop_index("ix_inference_usage_key_created")
        batch_op.drop_index("ix_inference_usage_wallet_created")
        batch_op.drop_index("ix_inference_usage_unbilled")

    op.drop_table("inference_usage")
