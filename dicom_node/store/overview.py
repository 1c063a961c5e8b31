"""Read-only views of the job table for the dashboard and the metrics.

Every function takes a connection; the caller owns the transaction. Nothing here returns patient names or IDs
unless asked to (``with_patient``), and then only for an admin who enabled it.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, func, select

from dicom_node.store.schema import Export, ExportState, Job, JobState, Patient, Series, SeriesState, Study

LOGGER = logging.getLogger(__name__)


def _seconds(later: dt.datetime | None, earlier: dt.datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return max(0.0, (later - earlier).total_seconds())


def queue_summary(conn: Connection, now: dt.datetime) -> dict[str, Any]:
    """Counts per state of series, jobs and exports, oldest queued ages, and the series completions so far."""
    out: dict[str, Any] = {}
    for name, model, states in (("series", Series, SeriesState), ("jobs", Job, JobState),
                                ("exports", Export, ExportState)):
        counts = {s.value: 0 for s in states}
        for state, n in conn.execute(select(model.state, func.count()).group_by(model.state)):
            counts[state.value if hasattr(state, "value") else str(state)] = int(n)
        out[name] = counts
    for name, model in (("job", Job), ("export", Export)):
        oldest = conn.execute(select(func.min(model.created_at)).where(model.state == "queued")).scalar()
        out[f"oldest_queued_{name}_seconds"] = _seconds(now, oldest) or 0.0
        oldest_running = conn.execute(select(func.min(model.created_at)).where(model.state == "running")).scalar()
        out[f"oldest_running_{name}_seconds"] = _seconds(now, oldest_running) or 0.0
    out["series_completed"] = int(conn.execute(select(func.coalesce(func.sum(Series.completion_count), 0))).scalar())
    return out


@dataclass
class SeriesView:
    """One processed (or routed) series as the dashboard shows it."""

    job_id: int | None
    series_uid: str
    study_uid: str
    modality: str
    description: str
    instances: int
    rule: str
    route_note: str
    model: str
    job_state: str
    job_error: str
    attempts: int
    worker: str
    derived_uid: str
    received_at: dt.datetime
    #: Seconds per stage: receive, quiet (until complete), queue, denoise; ``None`` when not reached.
    timings: dict[str, float | None]
    #: One entry per export: id, destination, state, sent, failed, attempts, seconds, last error.
    exports: list[dict[str, Any]] = field(default_factory=list)
    patient_name: str = ""
    patient_id: str = ""


def recent_series(conn: Connection, limit: int = 20, with_patient: bool = False) -> list[SeriesView]:
    """The last ``limit`` completed series with their newest job and its exports (newest first)."""
    from dicom_node.store.schema import Instance

    rows = conn.execute(
        select(Series.__table__, Study.study_uid, Study.patient_pk)
        .join(Study, Study.id == Series.study_pk)
        .where(Series.completion_count > 0)
        .order_by(Series.completed_at.desc(), Series.id.desc()).limit(limit)
    ).all()
    views = []
    for s in rows:
        job = conn.execute(select(Job.__table__).where(Job.series_pk == s.id).order_by(Job.version.desc())
                           .limit(1)).first()
        count = int(conn.execute(select(func.count(Instance.id)).where(Instance.series_pk == s.id)).scalar())
        if job is not None:
            exports = conn.execute(select(Export.__table__).where(Export.job_pk == job.id)
                                   .order_by(Export.id)).all()
        else:
            exports = conn.execute(select(Export.__table__).where(Export.series_uid == s.series_uid,
                                                                  Export.job_pk.is_(None))
                                   .order_by(Export.id)).all()
        timings = {
            "receive": _seconds(s.last_received_at, s.first_received_at),
            "quiet": _seconds(s.completed_at, s.last_received_at),
            "queue": _seconds(job.started_at, job.created_at) if job is not None else None,
            "denoise": (_seconds(job.finished_at, job.started_at)
                        if job is not None and job.state == JobState.succeeded else None),
        }
        view = SeriesView(
            job_id=job.id if job is not None else None, series_uid=s.series_uid, study_uid=s.study_uid,
            modality=s.modality, description=s.series_description, instances=count, rule=s.route_rule,
            route_note=s.route_note, model=job.model if job is not None else "",
            job_state=job.state.value if job is not None else "", job_error=job.last_error if job is not None else "",
            attempts=job.attempts if job is not None else 0, worker=job.worker_id if job is not None else "",
            derived_uid=job.output_series_uid if job is not None else "", received_at=s.first_received_at,
            timings=timings,
            exports=[{"id": e.id, "destination": e.destination, "state": e.state.value, "sent": e.sent_count,
                      "failed": e.failed_count, "attempts": e.attempts, "error": e.last_error,
                      "seconds": _seconds(e.finished_at, e.created_at)} for e in exports],
        )
        if with_patient and s.patient_pk is not None:
            patient = conn.execute(select(Patient.patient_name, Patient.patient_id)
                                   .where(Patient.id == s.patient_pk)).first()
            if patient is not None:
                view.patient_name, view.patient_id = patient.patient_name, patient.patient_id
        views.append(view)
    return views


def failures(conn: Connection, limit: int = 50) -> list[dict[str, Any]]:
    """Failed jobs and exports, newest first, with their reason."""
    out: list[dict[str, Any]] = []
    jobs = conn.execute(select(Job.__table__, Series.series_uid).join(Series, Series.id == Job.series_pk)
                        .where(Job.state == JobState.failed).order_by(Job.id.desc()).limit(limit)).all()
    for j in jobs:
        out.append({"kind": "job", "id": j.id, "series_uid": j.series_uid, "what": f"{j.rule} / {j.model}",
                    "attempts": j.attempts, "error": j.last_error, "at": j.finished_at})
    exports = conn.execute(select(Export.__table__).where(Export.state == ExportState.failed)
                           .order_by(Export.id.desc()).limit(limit)).all()
    for e in exports:
        out.append({"kind": "export", "id": e.id, "series_uid": e.series_uid, "what": f"to {e.destination}",
                    "attempts": e.attempts, "error": e.last_error, "at": e.finished_at})
    out.sort(key=lambda item: item["at"] or dt.datetime.min, reverse=True)
    return out[:limit]


def series_choices(conn: Connection, limit: int = 50) -> list[Any]:
    """Recent series (key, UID, modality, description, instance count) for the rules tester's pick list."""
    return conn.execute(select(Series.id, Series.series_uid, Series.modality, Series.series_description)
                        .order_by(Series.last_received_at.desc()).limit(limit)).all()


def series_row(conn: Connection, series_pk: int) -> Any:
    """The ``series`` row with key ``series_pk`` (or ``None``)."""
    return conn.execute(select(Series.__table__).where(Series.id == series_pk)).first()
