"""Rounds that grow: the models a round had when it was asked to grow (GrowScoring).

Revision ID: scorer_0003
Revises: scorer_0002
"""

import sqlalchemy as sa
from alembic import op

revision = "scorer_0003"
down_revision = "scorer_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL: the round is not growing. Else its models_total before it was asked to grow, so a
    # replica taking the growth over knows which statistics to reuse.
    op.add_column("scorer_rounds", sa.Column("grow_from", sa.Integer, nullable=True))


def downgrade() -> None:
    op.drop_column("scorer_rounds", "grow_from")
