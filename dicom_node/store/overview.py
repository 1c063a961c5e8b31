"""Read-only views of the job table for the dashboard, the command line and the metrics.

Every function takes a connection; the caller owns the transaction. Nothing here returns patient names or IDs
unless asked to (``with_patient``), and then only for an admin who enabled it.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, func, select

from dicom_node.store.schema import (
    Export,
    ExportInstance,
    ExportState,
    Instance,
    Job,
    JobState,
    Patient,
    Series,
    SeriesState,
    Study,
)

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
    out["exports_retrying"] = conn.execute(select(func.count(Export.id)).where(_retrying(Export))).scalar_one()
    out["series_completed"] = int(
        conn.execute(select(func.coalesce(func.sum(Series.completion_count), 0))).scalar_one())
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
    #: The trust check of the derived series ("" and ``None`` when not run).
    trust_verdict: str = ""
    trust_score: float | None = None


def recent_series(conn: Connection, limit: int = 20, with_patient: bool = False) -> list[SeriesView]:
    """The last ``limit`` completed series with their newest job and its exports (newest first)."""
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
        count = conn.execute(select(func.count(Instance.id)).where(Instance.series_pk == s.id)).scalar_one()
        if job is not None:
            exports = conn.execute(select(Export.__table__).where(Export.job_pk == job.id)
                                   .order_by(Export.id)).all()
        else:
            exports = conn.execute(select(Export.__table__).where(Export.series_uid == s.series_uid,
                                                                  Export.job_pk.is_(None))
                                   .order_by(Export.id)).all()
        timings = {
            # Of the last version: a re-send's receive time counts from the re-send (receiving_since).
            "receive": _seconds(s.last_received_at, s.receiving_since or s.first_received_at),
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
                      "retrying": e.state in (ExportState.queued, ExportState.running) and e.attempts > 0
                      and bool(e.last_error),
                      "next_attempt": e.not_before if e.state == ExportState.queued else None,
                      "seconds": _seconds(e.finished_at, e.created_at)} for e in exports],
        )
        if job is not None:
            view.trust_verdict, view.trust_score = job.trust_verdict, job.trust_score
        if with_patient and s.patient_pk is not None:
            patient = conn.execute(select(Patient.patient_name, Patient.patient_id)
                                   .where(Patient.id == s.patient_pk)).first()
            if patient is not None:
                view.patient_name, view.patient_id = patient.patient_name, patient.patient_id
        views.append(view)
    return views


def _retrying(model: Any) -> Any:
    """Queued or running again after a failed attempt: the work is not lost, but it is not getting through."""
    return (model.state.in_([ExportState.queued.value, ExportState.running.value]) & (model.attempts > 0)
            & (model.last_error != ""))


def _source_series(conn: Connection, series_pk: int | None, series_uid: str) -> Any:
    """The received series an export or job is about, with its study's description (``None`` if unknown)."""
    query = select(Series.id, Series.series_uid, Series.series_description, Series.modality,
                   Study.study_description, Study.study_uid).join(Study, Study.id == Series.study_pk)
    query = query.where(Series.id == series_pk) if series_pk is not None else query.where(
        Series.series_uid == series_uid)
    return conn.execute(query).first()


def failures(conn: Connection, limit: int = 50, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Failed jobs and exports, and exports retrying after a failed attempt, newest first, with their reason.

    Each item names the source series and study by description as well as by UID (``series_description``,
    ``study_description``, ``series_uid``: the received series), the state (``failed`` or ``retrying``) and,
    for a retrying export, when the next attempt is due (``next_attempt``, ``next_attempt_seconds``).
    """
    now = now or dt.datetime.now(dt.UTC).replace(tzinfo=None)
    out: list[dict[str, Any]] = []
    jobs = conn.execute(select(Job.__table__).where(Job.state == JobState.failed)
                        .order_by(Job.id.desc()).limit(limit)).all()
    for j in jobs:
        source = _source_series(conn, j.series_pk, "")
        out.append({"kind": "job", "id": j.id, "state": "failed", "what": f"{j.rule} / {j.model}",
                    "attempts": j.attempts, "error": j.last_error, "at": j.finished_at, "destination": "",
                    "next_attempt": None, "next_attempt_seconds": None, **_described(source, "")})
    exports = conn.execute(select(Export.__table__).where((Export.state == ExportState.failed) | _retrying(Export))
                           .order_by(Export.id.desc()).limit(limit)).all()
    for e in exports:
        job = conn.execute(select(Job.series_pk).where(Job.id == e.job_pk)).first() if e.job_pk else None
        source = _source_series(conn, job.series_pk if job else None, e.series_uid)
        failed = e.state == ExportState.failed
        what = f"to {e.destination}" + ("" if e.job_pk else " (original)")
        out.append({"kind": "export", "id": e.id, "state": "failed" if failed else "retrying", "what": what,
                    "attempts": e.attempts, "error": e.last_error,
                    "at": e.finished_at if failed else (e.heartbeat_at or e.created_at),
                    "destination": e.destination, "exported_series_uid": e.series_uid,
                    "next_attempt": None if failed else e.not_before,
                    "next_attempt_seconds": None if failed else _seconds(e.not_before, now) or 0.0,
                    **_described(source, e.series_uid)})
    out.sort(key=lambda item: item["at"] or dt.datetime.min, reverse=True)
    return out[:limit]


def _described(source: Any, fallback_uid: str) -> dict[str, str]:
    if source is None:
        return {"series_uid": fallback_uid, "series_description": "", "study_description": "", "study_uid": "",
                "modality": ""}
    return {"series_uid": source.series_uid, "series_description": source.series_description,
            "study_description": source.study_description, "study_uid": source.study_uid,
            "modality": source.modality}


@dataclass
class DestinationTrouble:
    """A destination whose exports are not getting through."""

    destination: str
    retrying: int
    failed: int
    #: When the oldest export still waiting for this destination was queued.
    since: dt.datetime | None
    last_error: str


def destination_troubles(conn: Connection, since: dt.datetime | None = None) -> list[DestinationTrouble]:
    """Destinations with exports retrying after a failed attempt, or failed (since ``since`` when given)."""
    failed_filter = Export.state == ExportState.failed
    if since is not None:
        failed_filter = failed_filter & (Export.finished_at >= since)
    rows = conn.execute(select(Export.destination, Export.state, Export.created_at, Export.last_error, Export.id)
                        .where(failed_filter | _retrying(Export)).order_by(Export.id)).all()
    by_name: dict[str, DestinationTrouble] = {}
    for row in rows:
        trouble = by_name.setdefault(row.destination, DestinationTrouble(row.destination, 0, 0, None, ""))
        if row.state == ExportState.failed:
            trouble.failed += 1
        else:
            trouble.retrying += 1
            trouble.since = min(trouble.since or row.created_at, row.created_at)
        trouble.last_error = row.last_error
    return list(by_name.values())


def unrouted_series(conn: Connection, limit: int = 20) -> list[Any]:
    """Completed series that no rule matched, or that were not denoised for a reason (loop guard, an unchanged
    re-send), newest first: key, UID, modality, description, completion time and the reason."""
    return list(conn.execute(
        select(Series.id, Series.series_uid, Series.modality, Series.series_description, Series.completed_at,
               Series.route_note)
        .where(Series.completion_count > 0, Series.route_note != "")
        .order_by(Series.completed_at.desc(), Series.id.desc()).limit(limit)))


def series_choices(conn: Connection, limit: int = 50) -> list[Any]:
    """Recent series (key, UID, modality, description, instance count) for the rules tester's pick list."""
    return list(conn.execute(select(Series.id, Series.series_uid, Series.modality, Series.series_description)
                             .order_by(Series.last_received_at.desc()).limit(limit)))


def series_row(conn: Connection, series_pk: int) -> Any:
    """The ``series`` row with key ``series_pk`` (or ``None``)."""
    return conn.execute(select(Series.__table__).where(Series.id == series_pk)).first()


def recent_jobs(conn: Connection, state: str | None = None, limit: int = 50) -> list[Any]:
    """The newest jobs (optionally in one state), each with its series' ``series_uid``."""
    query = select(Job.__table__, Series.series_uid).join(Series, Series.id == Job.series_pk)
    if state:
        query = query.where(Job.state == state)
    return list(conn.execute(query.order_by(Job.id.desc()).limit(limit)).all())


def recent_exports(conn: Connection, state: str | None = None, limit: int = 50) -> list[Any]:
    """The newest exports (optionally in one state)."""
    query = select(Export.__table__)
    if state:
        query = query.where(Export.state == state)
    return list(conn.execute(query.order_by(Export.id.desc()).limit(limit)).all())


def job_detail(conn: Connection, job_id: int) -> tuple[Any, Any, list[Any]] | None:
    """A job's row, its series' row and its exports' rows; ``None`` when there is no such job."""
    job = conn.execute(select(Job.__table__).where(Job.id == job_id)).one_or_none()
    if job is None:
        return None
    series = conn.execute(select(Series.__table__).where(Series.id == job.series_pk)).one()
    exports = conn.execute(select(Export.__table__).where(Export.job_pk == job.id).order_by(Export.id)).all()
    return job, series, list(exports)


def export_detail(conn: Connection, export_id: int) -> tuple[Any, list[Any]] | None:
    """An export's row and its instances' rows; ``None`` when there is no such export."""
    export = conn.execute(select(Export.__table__).where(Export.id == export_id)).one_or_none()
    if export is None:
        return None
    items = conn.execute(select(ExportInstance.__table__).where(ExportInstance.export_pk == export.id)
                         .order_by(ExportInstance.id)).all()
    return export, list(items)


def state_of(conn: Connection, kind: str, key: int) -> Any:
    """The state of job or export ``key`` (``kind`` "job" or "export"); ``None`` when there is none."""
    table = Job if kind == "job" else Export
    return conn.execute(select(table.state).where(table.id == key)).scalar()


def series_uid_of(conn: Connection, kind: str, key: int) -> str:
    """The SeriesInstanceUID a job (its source series) or an export (the series it sends) is about ("" if none)."""
    if kind == "export":
        return conn.execute(select(Export.series_uid).where(Export.id == key)).scalar() or ""
    return conn.execute(select(Series.series_uid).join(Job, Job.series_pk == Series.id)
                        .where(Job.id == key)).scalar() or ""
