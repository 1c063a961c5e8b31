"""The job and export queues in the job table: enqueue, claim atomically, heartbeat, finish, retry, cancel.

Claims are one statement: ``UPDATE .. WHERE id = (SELECT .. LIMIT 1) RETURNING ..``. On SQLite the caller's
transaction starts with ``BEGIN IMMEDIATE`` (see :mod:`dicom_node.store.database`), so two claimers never get the
same row; on PostgreSQL the sub-select takes ``FOR UPDATE SKIP LOCKED``, so workers on several hosts claim
different rows without waiting for each other. Every function takes a connection: the caller owns the
transaction.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, insert, select, text, update

from dicom_node.store.schema import Export, ExportInstance, ExportState, Instance, Job, JobState, Series


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter (a small pure object, as in procrastinate)."""

    max_attempts: int
    base_seconds: float
    max_seconds: float

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt: uniform in [cap/2, cap]."""
        cap = min(self.max_seconds, self.base_seconds * 2 ** max(0, attempts - 1))
        return (rng or random).uniform(cap / 2, cap)

    def gives_up(self, attempts: int) -> bool:
        return attempts >= self.max_attempts


def _skip_locked(conn: Connection) -> str:
    return " FOR UPDATE SKIP LOCKED" if conn.dialect.name == "postgresql" else ""


# ------------------------------------------------------------------------------------------------- jobs


def enqueue_job(conn: Connection, series_pk: int, version: int, rule: str, model: str, strength: float,
                now: dt.datetime) -> int:
    """Queue denoising version ``version`` of a series; return the job's key."""
    return int(conn.execute(insert(Job).values(
        series_pk=series_pk, version=version, rule=rule, model=model, strength=strength,
        state=JobState.queued, attempts=0, not_before=now, created_at=now,
    ).returning(Job.id)).scalar_one())


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker now runs."""

    id: int
    series_pk: int
    version: int
    rule: str
    model: str
    strength: float
    attempts: int


def claim_job(conn: Connection, worker_id: str, now: dt.datetime) -> ClaimedJob | None:
    """Atomically take the oldest runnable queued job, or return ``None``."""
    row = conn.execute(text(
        "UPDATE jobs SET state = 'running', worker_id = :worker, attempts = attempts + 1, started_at = :now, "
        "heartbeat_at = :now WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND not_before <= :now "
        f"ORDER BY id LIMIT 1{_skip_locked(conn)}) "
        "RETURNING id, series_pk, version, rule, model, strength, attempts"
    ), {"worker": worker_id, "now": now}).first()
    return ClaimedJob(*row) if row else None


def heartbeat_job(conn: Connection, job_id: int, worker_id: str, now: dt.datetime) -> bool:
    """Record that the worker is alive; ``False`` when the job is no longer ours (cancelled or taken over)."""
    result = conn.execute(update(Job).where(Job.id == job_id, Job.worker_id == worker_id,
                                            Job.state == JobState.running).values(heartbeat_at=now))
    return result.rowcount == 1


def finish_job(conn: Connection, job_id: int, worker_id: str, output_series_uid: str, now: dt.datetime) -> bool:
    """Mark a running job succeeded; ``False`` (and nothing changed) when it is no longer ours."""
    result = conn.execute(update(Job).where(Job.id == job_id, Job.worker_id == worker_id,
                                            Job.state == JobState.running).values(
        state=JobState.succeeded, output_series_uid=output_series_uid, finished_at=now, last_error=""))
    return result.rowcount == 1


def fail_job(conn: Connection, job_id: int, reason: str, now: dt.datetime, retry_at: dt.datetime | None) -> None:
    """Record a failure: back to ``queued`` at ``retry_at``, or ``failed`` for good when it is ``None``."""
    values: dict[str, Any] = {"last_error": reason[:4000], "worker_id": ""}
    if retry_at is None:
        values.update(state=JobState.failed, finished_at=now)
    else:
        values.update(state=JobState.queued, not_before=retry_at)
    conn.execute(update(Job).where(Job.id == job_id, Job.state == JobState.running).values(**values))


def requeue_stalled_jobs(conn: Connection, now: dt.datetime, timeout_seconds: float) -> list[int]:
    """Put running jobs whose heartbeat is older than the timeout back in the queue; return their keys."""
    cutoff = now - dt.timedelta(seconds=timeout_seconds)
    ids = list(conn.execute(select(Job.id).where(Job.state == JobState.running, Job.heartbeat_at < cutoff)).scalars())
    if ids:
        conn.execute(update(Job).where(Job.id.in_(ids), Job.state == JobState.running).values(
            state=JobState.queued, worker_id="", not_before=now,
            last_error="worker stopped sending heartbeats; taken up again"))
    return ids


def series_instance_paths(conn: Connection, series_pk: int) -> list[str]:
    """Relative paths of a series' instances."""
    return list(conn.execute(select(Instance.path).where(Instance.series_pk == series_pk)
                             .order_by(Instance.id)).scalars())


# ------------------------------------------------------------------------------------------------- exports


def enqueue_export(conn: Connection, series_uid: str, destination: str, instances: list[tuple[str, str]],
                   now: dt.datetime, job_pk: int | None = None) -> int:
    """Queue sending ``instances`` (SOP Instance UID, relative path) to ``destination``; return the key."""
    export_pk = int(conn.execute(insert(Export).values(
        job_pk=job_pk, series_uid=series_uid, destination=destination, state=ExportState.queued, attempts=0,
        not_before=now, created_at=now,
    ).returning(Export.id)).scalar_one())
    if instances:
        conn.execute(insert(ExportInstance), [
            {"export_pk": export_pk, "sop_instance_uid": uid, "path": path, "error": ""} for uid, path in instances
        ])
    return export_pk


@dataclass(frozen=True)
class ClaimedExport:
    """An export this exporter now runs."""

    id: int
    series_uid: str
    destination: str
    attempts: int


def claim_export(conn: Connection, destination: str, worker_id: str, now: dt.datetime) -> ClaimedExport | None:
    """Atomically take the oldest runnable export to ``destination``, or return ``None``."""
    row = conn.execute(text(
        "UPDATE exports SET state = 'running', worker_id = :worker, attempts = attempts + 1, heartbeat_at = :now "
        "WHERE id = (SELECT id FROM exports WHERE state = 'queued' AND destination = :destination "
        f"AND not_before <= :now ORDER BY id LIMIT 1{_skip_locked(conn)}) "
        "RETURNING id, series_uid, destination, attempts"
    ), {"worker": worker_id, "now": now, "destination": destination}).first()
    return ClaimedExport(*row) if row else None


def pending_export_instances(conn: Connection, export_pk: int) -> list[tuple[int, str, str]]:
    """(key, SOP Instance UID, path) of the export's instances not yet accepted by the destination."""
    return [tuple(r) for r in conn.execute(  # type: ignore[misc]
        select(ExportInstance.id, ExportInstance.sop_instance_uid, ExportInstance.path)
        .where(ExportInstance.export_pk == export_pk,
               (ExportInstance.status.is_(None)) | (ExportInstance.status.notin_(SUCCESS_STATUSES)))
        .order_by(ExportInstance.id))]


#: C-STORE statuses that mean stored: success and the warnings of PS3.4 B.2.3.
SUCCESS_STATUSES = (0x0000, 0xB000, 0xB007, 0xB006)


def record_instance_status(conn: Connection, export_instance_pk: int, status: int | None, error: str,
                           now: dt.datetime) -> None:
    """Record the destination's answer for one instance (``None``: no answer)."""
    conn.execute(update(ExportInstance).where(ExportInstance.id == export_instance_pk).values(
        status=status, error=error[:1000], sent_at=now))


def finish_export(conn: Connection, export_pk: int, now: dt.datetime, error: str,
                  retry_at: dt.datetime | None, give_up: bool) -> ExportState:
    """Close an attempt: succeeded when every instance was accepted, else queued again or failed."""
    counts = conn.execute(select(
        func.count(ExportInstance.id),
        func.count(ExportInstance.id).filter(ExportInstance.status.in_(SUCCESS_STATUSES)),
    ).where(ExportInstance.export_pk == export_pk)).one()
    total, sent = int(counts[0]), int(counts[1])
    values: dict[str, Any] = {"sent_count": sent, "failed_count": total - sent, "worker_id": ""}
    if sent == total and not error:
        state = ExportState.succeeded
        values.update(finished_at=now, last_error="")
    elif give_up or retry_at is None:
        state = ExportState.failed
        values.update(finished_at=now, last_error=error or f"{total - sent} of {total} instances not accepted")
    else:
        state = ExportState.queued
        values.update(not_before=retry_at, last_error=error or f"{total - sent} of {total} instances not accepted")
    conn.execute(update(Export).where(Export.id == export_pk, Export.state == ExportState.running)
                 .values(state=state, **values))
    return state


def heartbeat_export(conn: Connection, export_pk: int, now: dt.datetime) -> None:
    conn.execute(update(Export).where(Export.id == export_pk).values(heartbeat_at=now))


def requeue_stalled_exports(conn: Connection, now: dt.datetime, timeout_seconds: float) -> list[int]:
    """Put running exports without progress for the timeout back in the queue; return their keys."""
    cutoff = now - dt.timedelta(seconds=timeout_seconds)
    ids = list(conn.execute(select(Export.id).where(Export.state == ExportState.running,
                                                    Export.heartbeat_at < cutoff)).scalars())
    if ids:
        conn.execute(update(Export).where(Export.id.in_(ids)).values(
            state=ExportState.queued, worker_id="", not_before=now,
            last_error="exporter stopped making progress; taken up again"))
    return ids


# ------------------------------------------------------------------------------------------------- operator actions


def retry(conn: Connection, kind: str, key: int, now: dt.datetime) -> bool:
    """Put a failed or cancelled job or export back in the queue with fresh attempts; ``False`` if not found."""
    model = Job if kind == "job" else Export
    result = conn.execute(update(model).where(
        model.id == key, model.state.in_([JobState.failed.value, JobState.cancelled.value])
    ).values(state="queued", attempts=0, not_before=now, finished_at=None))
    return result.rowcount == 1


def cancel(conn: Connection, kind: str, key: int, now: dt.datetime) -> bool:
    """Cancel a queued, running or failed job or export; ``False`` if it is finished or unknown."""
    model = Job if kind == "job" else Export
    result = conn.execute(update(model).where(
        model.id == key, model.state.in_(["queued", "running", "failed"])
    ).values(state="cancelled", finished_at=now, worker_id=""))
    return result.rowcount == 1


def series_by_pk(conn: Connection, series_pk: int) -> Any:
    return conn.execute(select(Series.__table__).where(Series.id == series_pk)).one()


def requeue_orphans(conn: Connection, host: str, now: dt.datetime) -> list[str]:
    """Requeue running jobs and exports claimed by processes of ``host`` that no longer exist.

    Worker ids are ``host:pid:role``; after a crash and restart on the same host the old pid is gone, so its work
    is taken up at once instead of after the stall timeout.
    """
    import os

    requeued: list[str] = []
    for model, kind in ((Job, "job"), (Export, "export")):
        rows = conn.execute(select(model.id, model.worker_id).where(model.state == "running",
                                                                    model.worker_id.like(f"{host}:%"))).all()
        for key, worker_id in rows:
            try:
                pid = int(worker_id.split(":")[1])
                os.kill(pid, 0)
                continue  # still alive
            except (ValueError, IndexError, ProcessLookupError):
                pass
            except PermissionError:
                continue  # alive, another user's
            conn.execute(update(model).where(model.id == key, model.state == "running").values(
                state="queued", worker_id="", not_before=now,
                last_error=f"process {worker_id} ended while running it; taken up again"))
            requeued.append(f"{kind} {key}")
    return requeued
