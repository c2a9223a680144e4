"""gateway_submissions and gateway_rounds: submissions, which round holds each, and the batch handed
to the scorer. The rounds' state, progress and result are the scorer's (asked over gRPC).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gateway_submissions",
        sa.Column("submission_id", sa.String(64), primary_key=True),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("contributor", sa.String(64), nullable=False),
        # Record ids are "{submission_id}-{i}" for i < n_records: not stored one by one.
        sa.Column("n_records", sa.Integer(), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),  # gateway_pb2.SubmissionState
        sa.Column("round_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("failed_rounds", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("failure_reason", sa.Text(), nullable=False, server_default=""),
        # ISO 8601 UTC with milliseconds, as the API shows it: sorts as it reads.
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    # A task's pending queue in arrival order (counts, claims); a contributor's list; a round's members.
    op.create_index("ix_gateway_submissions_queue", "gateway_submissions",
                    ["task_id", "state", "created_at", "submission_id"])
    op.create_index("ix_gateway_submissions_contributor", "gateway_submissions",
                    ["contributor", "created_at", "submission_id"])
    op.create_index("ix_gateway_submissions_round", "gateway_submissions", ["round_id"])
    # The reconciler's question: which rounds still hold IN_ROUND submissions.
    op.create_index("ix_gateway_submissions_state_round", "gateway_submissions", ["state", "round_id"])
    op.create_table(
        "gateway_rounds",
        sa.Column("round_id", sa.String(64), primary_key=True),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("n_records", sa.Integer(), nullable=False),
        # Seconds since the epoch: when the records were claimed, when the batch went to the scorer,
        # when an unstarted round gave its records back (then it never reaches the scorer).
        sa.Column("claimed_at", sa.Float(), nullable=False),
        sa.Column("handed_at", sa.Float(), nullable=True),
        sa.Column("released_at", sa.Float(), nullable=True),
        sa.Column("batch", sa.LargeBinary(), nullable=True),  # common_pb2.BlobRef, serialized
    )
    op.create_index("ix_gateway_rounds_task", "gateway_rounds", ["task_id", "round_id"])
    # Who has records in a round (WatchRound is theirs), kept after the submissions move on.
    op.create_table(
        "gateway_round_contributors",
        sa.Column("round_id", sa.String(64), primary_key=True),
        sa.Column("contributor", sa.String(64), primary_key=True),
    )


def downgrade() -> None:
    op.drop_table("gateway_round_contributors")
    op.drop_table("gateway_rounds")
    op.drop_table("gateway_submissions")
