"""The preparation stage as a long-running operation: one row per task and base model.

Revision ID: scorer_0002
Revises: scorer_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "scorer_0002"
down_revision = "scorer_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "scorer_preparations",
        sa.Column("task_id", sa.String(128), primary_key=True),
        sa.Column("base_model_sha256", sa.String(64), primary_key=True),
        sa.Column("preparation_id", sa.String(64), nullable=False),
        sa.Column("state", sa.Integer, nullable=False),           # scorer_pb2.PreparationState
        sa.Column("models_done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("models_total", sa.Integer, nullable=False),
        sa.Column("message", sa.Text, nullable=False, server_default=""),
        sa.Column("refit", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        sa.Column("lease_until", sa.Float, nullable=True),        # epoch seconds
        sa.Column("started_at", sa.Float, nullable=False),
        # This run's start (a takeover runs it again from model 0): the pace of the estimate.
        sa.Column("run_started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    # The claim loop's query: preparations still PREPARING whose lease ran out.
    op.create_index("ix_scorer_preparations_state_lease", "scorer_preparations", ["state", "lease_until"])


def downgrade() -> None:
    op.drop_index("ix_scorer_preparations_state_lease", "scorer_preparations")
    op.drop_table("scorer_preparations")
