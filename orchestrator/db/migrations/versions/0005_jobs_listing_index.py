"""index for listing jobs newest first: GET /api/jobs orders by (created_at, id) descending, which
without it is a sort of the whole table on every call

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""
from collections.abc import Sequence

from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index('ix_jobs_created_order', 'jobs', ['created_at', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_jobs_created_order', table_name='jobs')
