"""registry_tasks: one row per task, the Task protobuf beside the columns that are queried.

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
        "registry_tasks",
        sa.Column("task_id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        # When the row was created (UTC, microseconds): the order of ListTasks, ties by task_id.
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("task", sa.LargeBinary(), nullable=False),  # registry_pb2.Task, serialized
    )
    # Paging in created order: all tasks, and one owner's (the builder's view).
    op.create_index("ix_registry_tasks_created", "registry_tasks", ["created_at", "task_id"])
    op.create_index("ix_registry_tasks_owner", "registry_tasks", ["owner", "created_at", "task_id"])


def downgrade() -> None:
    op.drop_table("registry_tasks")
