"""The scorer's rounds (state, progress, lease) and offline Gaussians.

Revision ID: scorer_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "scorer_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "scorer_rounds",
        sa.Column("round_id", sa.String(128), primary_key=True),
        sa.Column("task_id", sa.String(128), nullable=False),
        sa.Column("state", sa.Integer, nullable=False),
        sa.Column("models_done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("models_total", sa.Integer, nullable=False),
        sa.Column("n_records", sa.Integer, nullable=False),
        sa.Column("message", sa.Text, nullable=False, server_default=""),
        # BlobRefs (serialized protobuf): the batch scored, and the RoundResult once DONE.
        sa.Column("batch_ref", sa.LargeBinary, nullable=False),
        sa.Column("record_ids", sa.Text, nullable=False),    # JSON list, batch order
        sa.Column("contributors", sa.Text, nullable=False),  # JSON list, batch order
        sa.Column("result_ref", sa.LargeBinary, nullable=True),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        sa.Column("lease_until", sa.Float, nullable=True),   # epoch seconds
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_scorer_rounds_task_id", "scorer_rounds", ["task_id"])
    # The claim loop's query: rounds not finished whose lease ran out.
    op.create_index("ix_scorer_rounds_state_lease", "scorer_rounds", ["state", "lease_until"])
    op.create_table(
        "scorer_offline",
        sa.Column("task_id", sa.String(128), primary_key=True),
        sa.Column("base_model_sha256", sa.String(64), primary_key=True),
        sa.Column("gaussian", sa.LargeBinary, nullable=False),  # OfflineGaussian (serialized protobuf)
        sa.Column("fitted_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("scorer_offline")
    op.drop_index("ix_scorer_rounds_state_lease", "scorer_rounds")
    op.drop_index("ix_scorer_rounds_task_id", "scorer_rounds")
    op.drop_table("scorer_rounds")
