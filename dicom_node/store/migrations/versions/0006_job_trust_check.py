"""job trust check: score, verdict and detail of the derived series' trust check

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 18:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('trust_score', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('trust_verdict', sa.String(length=8), server_default='', nullable=False))
        batch_op.add_column(sa.Column('trust_detail', sa.Text(), server_default='', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('trust_detail')
        batch_op.drop_column('trust_verdict')
        batch_op.drop_column('trust_score')
