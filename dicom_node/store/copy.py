"""Copy the job table from one database to another (SQLite to PostgreSQL when a site scales out).

Every table is copied row by row with its keys, parents before children, in one transaction on the target, and
PostgreSQL's key sequences are moved past the copied keys. The target is brought to the newest schema first and
must be empty, so a copy is never merged into a live database by mistake. Stop the node before copying: rows
written to the source during the copy would not be carried over.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine, func, select, text

from dicom_node.store.database import migrate, schema_version
from dicom_node.store.schema import Base

LOGGER = logging.getLogger(__name__)

#: Tables in an order where every foreign key points at a table already copied.
TABLE_ORDER = ("patients", "studies", "series", "instances", "jobs", "exports", "export_instances", "audit_events")
BATCH = 2000


class CopyRefused(Exception):
    """The copy cannot start (the target is not empty, or the source has no schema); the reason is the message."""


def copy_database(source: Engine, target: Engine) -> dict[str, int]:
    """Copy every row of ``source`` into the empty ``target``; return rows copied per table.

    Raises
    ------
    CopyRefused
        When the target already holds rows, or the source is not a dicom-node database.
    """
    if schema_version(source) is None:
        raise CopyRefused("the source database has no dicom-node schema")
    migrate(source)  # an older node's database: bring it to the schema we copy into
    migrate(target)
    tables = [Base.metadata.tables[name] for name in TABLE_ORDER]
    copied: dict[str, int] = {}
    with source.connect() as src, target.begin() as dst:
        for table in tables:
            present = dst.execute(select(func.count()).select_from(table)).scalar()
            if present:
                raise CopyRefused(f"the target already has {present} row(s) in {table.name}; it must be empty")
        for table in tables:
            count = 0
            last = None
            while True:
                q = select(table).order_by(table.c.id).limit(BATCH)
                if last is not None:
                    q = q.where(table.c.id > last)
                rows = [dict(r._mapping) for r in src.execute(q)]
                if not rows:
                    break
                dst.execute(table.insert(), rows)
                count += len(rows)
                last = rows[-1]["id"]
            copied[table.name] = count
            if dst.dialect.name == "postgresql":
                dst.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                                 f"COALESCE((SELECT MAX(id) FROM {table.name}), 0) + 1, false)"))
            LOGGER.info("copied %d row(s) of %s", count, table.name)
    return copied
