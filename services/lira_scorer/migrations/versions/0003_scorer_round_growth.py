"""Rounds that grow (GrowScoring) and recipe comparison variants (CompareScoringRecipes).

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
    # A recipe comparison's variant is a round of its own on its round's batch: which round it
    # varies, its name, the strategy it runs instead of the task's, and the records it is evaluated
    # on (the batch, then held-out builder records: utility).
    op.add_column("scorer_rounds", sa.Column("variant_of", sa.String(128), nullable=True))
    op.add_column("scorer_rounds", sa.Column("variant_name", sa.Text, nullable=True))
    op.add_column("scorer_rounds", sa.Column("strategy_ref", sa.LargeBinary, nullable=True))
    op.add_column("scorer_rounds", sa.Column("eval_ref", sa.LargeBinary, nullable=True))
    op.create_index("ix_scorer_rounds_variant_of", "scorer_rounds", ["variant_of"])


def downgrade() -> None:
    op.drop_index("ix_scorer_rounds_variant_of", "scorer_rounds")
    for column in ("eval_ref", "strategy_ref", "variant_name", "variant_of", "grow_from"):
        op.drop_column("scorer_rounds", column)
