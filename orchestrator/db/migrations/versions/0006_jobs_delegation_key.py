"""jobs.delegation_key: a delegating worker's key for each child it submits, unique per parent, so a
submit retried after its answer was lost finds the child instead of making a second one

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('delegation_key', sa.String(length=128), nullable=True))
    op.create_index(
        'ux_jobs_parent_delegation_key', 'jobs', ['parent_job_id', 'delegation_key'], unique=True
    )


def downgrade() -> None:
    op.drop_index('ux_jobs_parent_delegation_key', table_name='jobs')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('delegation_key')
