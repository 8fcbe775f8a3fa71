"""jobs.limits: per-job sandbox limits (memory, processes, network)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('limits', sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'limits')
