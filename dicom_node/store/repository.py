"""Reads and writes of the job table. Every function takes a connection; the caller owns the transaction."""

from __future__ import annotations

import datetime as dt
import enum
import logging
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select, text

from dicom_node.store.schema import (
    Export,
    ExportState,
    Instance,
    Job,
    JobState,
    Series,
    SeriesState,
)

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceFacts:
    """What the job table keeps of one received instance: UIDs and the tags routing needs, no pixels."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""
    accession_number: str = ""
    study_description: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part: str = ""
    manufacturer: str = ""
    image_type: str = ""
    slice_thickness: float | None = None
    instance_number: int | None = None
    calling_ae: str = ""
    called_ae: str = ""
    is_node_output: bool = False


# Plain SQL upserts, built once: ``INSERT .. ON CONFLICT .. DO UPDATE .. RETURNING`` is the same on SQLite
# (3.35+) and PostgreSQL, and prepared text avoids rebuilding SQLAlchemy constructs on the receive hot path.
_UPSERT_PATIENT = text(
    "INSERT INTO patients (patient_id, issuer, patient_name, created_at) "
    "VALUES (:patient_id, :issuer, :patient_name, :now) "
    "ON CONFLICT (patient_id, issuer) DO UPDATE SET patient_name = excluded.patient_name RETURNING id"
)
_UPSERT_STUDY = text(
    "INSERT INTO studies (study_uid, patient_pk, study_date, accession_number, study_description, created_at) "
    "VALUES (:study_uid, :patient_pk, :study_date, :accession_number, :study_description, :now) "
    "ON CONFLICT (study_uid) DO UPDATE SET study_uid = excluded.study_uid RETURNING id"
)
_UPSERT_SERIES = text(
    "INSERT INTO series (series_uid, study_pk, modality, series_number, series_description, body_part, "
    "manufacturer, image_type, slice_thickness, calling_ae, called_ae, is_node_output, state, completion_count, "
    "first_received_at, last_received_at, receiving_since) "
    "VALUES (:series_uid, :study_pk, :modality, :series_number, :series_description, :body_part, :manufacturer, "
    ":image_type, :slice_thickness, :calling_ae, :called_ae, :is_node_output, 'receiving', 0, :now, :now, :now) "
    # A completed series that receives again starts a new version: its receive time counts from now. (Every SET
    # expression reads the row as it was before the update, on SQLite and PostgreSQL alike.)
    "ON CONFLICT (series_uid) DO UPDATE SET last_received_at = excluded.last_received_at, state = 'receiving', "
    "receiving_since = CASE WHEN series.state = 'receiving' AND series.receiving_since IS NOT NULL "
    "THEN series.receiving_since ELSE excluded.last_received_at END "
    "RETURNING id"
)
_UPSERT_INSTANCE = text(
    "INSERT INTO instances (sop_instance_uid, series_pk, sop_class_uid, transfer_syntax_uid, instance_number, "
    "path, size_bytes, received_at, receive_count) "
    "VALUES (:sop_instance_uid, :series_pk, :sop_class_uid, :transfer_syntax_uid, :instance_number, :path, "
    ":size_bytes, :now, 1) "
    "ON CONFLICT (sop_instance_uid) DO UPDATE SET series_pk = excluded.series_pk, "
    "transfer_syntax_uid = excluded.transfer_syntax_uid, path = excluded.path, size_bytes = excluded.size_bytes, "
    "received_at = excluded.received_at, receive_count = instances.receive_count + 1 RETURNING id"
)


def _driver_sql(sql: str, dialect: str) -> str:
    """Rewrite ``:name`` parameters for the driver (sqlite3 takes them as they are; psycopg wants pyformat)."""
    return sql if dialect == "sqlite" else re.sub(r":(\w+)", r"%(\1)s", sql)


def _driver_value(value: Any, dialect: str) -> Any:
    """Bind values as SQLAlchemy would store them (SQLite keeps datetimes as text with microseconds)."""
    if dialect == "sqlite" and isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


def record_instance(conn: Connection, facts: InstanceFacts, path: str, size_bytes: int, now: dt.datetime) -> int:
    """Record a stored instance (and its patient, study and series when new); return the instance's key.

    Receiving the same SOP Instance UID again updates its row and counts the re-send; the series goes back to
    ``receiving`` so a late instance after completion leads to a new job version.

    This is the C-STORE handler's hot path, so the four upserts go straight to the driver's cursor, inside the
    caller's transaction: through SQLAlchemy's execution layer they cost three times as much (0.86 ms against
    0.3 ms per instance on SQLite).
    """
    dialect = conn.dialect.name
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]

    def upsert(statement: Any, params: dict[str, Any]) -> int:
        sql = _DRIVER_SQL.get((statement, dialect))
        if sql is None:
            sql = _DRIVER_SQL[(statement, dialect)] = _driver_sql(statement.text, dialect)
        cursor.execute(sql, {k: _driver_value(v, dialect) for k, v in params.items()})
        row = cursor.fetchone()
        if row is None:
            raise RuntimeError("upsert returned no row")
        return int(row[0])

    try:
        patient_pk = upsert(_UPSERT_PATIENT, {
            "patient_id": facts.patient_id, "issuer": facts.issuer_of_patient_id,
            "patient_name": facts.patient_name, "now": now,
        })
        study_pk = upsert(_UPSERT_STUDY, {
            "study_uid": facts.study_uid, "patient_pk": patient_pk, "study_date": facts.study_date,
            "accession_number": facts.accession_number, "study_description": facts.study_description, "now": now,
        })
        series_pk = upsert(_UPSERT_SERIES, {
            "series_uid": facts.series_uid, "study_pk": study_pk, "modality": facts.modality,
            "series_number": facts.series_number, "series_description": facts.series_description,
            "body_part": facts.body_part, "manufacturer": facts.manufacturer, "image_type": facts.image_type,
            "slice_thickness": facts.slice_thickness, "calling_ae": facts.calling_ae, "called_ae": facts.called_ae,
            "is_node_output": facts.is_node_output, "now": now,
        })
        return upsert(_UPSERT_INSTANCE, {
            "sop_instance_uid": facts.sop_instance_uid, "series_pk": series_pk, "sop_class_uid": facts.sop_class_uid,
            "transfer_syntax_uid": facts.transfer_syntax_uid, "instance_number": facts.instance_number,
            "path": path, "size_bytes": size_bytes, "now": now,
        })
    finally:
        cursor.close()


#: The upserts rewritten for each dialect's driver, made on first use.
_DRIVER_SQL: dict[tuple[Any, str], str] = {}


def forget_instance(conn: Connection, instance_pk: int) -> None:
    """Delete an instance's row (a write that failed after the row was recorded; never acknowledged)."""
    conn.execute(text("DELETE FROM instances WHERE id = :id"), {"id": instance_pk})


def known_instance_paths(conn: Connection) -> set[str]:
    """Return the relative paths of every recorded instance (used to reconcile the spool at start-up)."""
    return set(conn.execute(select(Instance.path)).scalars())


@dataclass
class StatusCounts:
    """Counts shown by ``dicom-node status``."""

    series: dict[str, int]
    jobs: dict[str, int]
    exports: dict[str, int]
    instances: int
    stored_bytes: int


def status_counts(conn: Connection) -> StatusCounts:
    """Count series, jobs and exports per state, and the instances stored."""

    def by_state(model: Any, states: type[enum.Enum]) -> dict[str, int]:
        counts = {s.value: 0 for s in states}
        for state, n in conn.execute(select(model.state, func.count()).group_by(model.state)):
            counts[state.value if hasattr(state, "value") else str(state)] = n
        return counts

    instances, stored = conn.execute(
        select(func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0))
    ).one()
    return StatusCounts(
        series=by_state(Series, SeriesState),
        jobs=by_state(Job, JobState),
        exports=by_state(Export, ExportState),
        instances=int(instances),
        stored_bytes=int(stored),
    )
