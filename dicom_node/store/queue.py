"""The job and export queues in the job table: enqueue, claim atomically, heartbeat, finish, retry, cancel.

Claims are one statement: ``UPDATE .. WHERE id = (SELECT .. LIMIT 1) RETURNING ..``. On SQLite the caller's
transaction starts with ``BEGIN IMMEDIATE`` (see :mod:`dicom_node.store.database`), so two claimers never get the
same row; on PostgreSQL the sub-select takes ``FOR UPDATE SKIP LOCKED``, so workers on several hosts claim
different rows without waiting for each other. Every function takes a connection: the caller owns the
transaction.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import random
import secrets
import socket
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, text, update

from dicom_node.store.schema import (
    Export,
    ExportInstance,
    ExportState,
    Instance,
    Job,
    JobState,
    NodeProcess,
    Series,
    SeriesState,
)


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


@dataclass(frozen=True)
class VersionInstances:
    """The instances one version of a series covers (what its job denoises, and nothing that came later)."""

    count: int
    #: The highest instance key of the version: the job takes the series' instances with keys up to it.
    last_instance_pk: int | None
    #: SHA-256 of the sorted SOP Instance UIDs: equal for an unchanged re-send.
    digest: str


def version_instances(conn: Connection, series_pk: int) -> VersionInstances:
    """The instances a series holds now, as a version's job will cover them."""
    rows = conn.execute(select(Instance.id, Instance.sop_instance_uid)
                        .where(Instance.series_pk == series_pk)).all()
    digest = hashlib.sha256("\n".join(sorted(uid for _, uid in rows)).encode("ascii", "replace")).hexdigest()
    return VersionInstances(len(rows), max((pk for pk, _ in rows), default=None), digest)


def enqueue_job(conn: Connection, series_pk: int, version: int, rule: str, model: str, strength: float,
                now: dt.datetime, instances: VersionInstances | None = None) -> int:
    """Queue denoising version ``version`` of a series; return the job's key.

    ``instances`` fixes what the job covers (:func:`version_instances`); without it the job takes every instance
    the series has when it runs.
    """
    return int(conn.execute(insert(Job).values(
        series_pk=series_pk, version=version, rule=rule, model=model, strength=strength,
        state=JobState.queued, attempts=0, not_before=now, created_at=now,
        last_instance_pk=instances.last_instance_pk if instances else None,
        instance_count=instances.count if instances else None,
        instances_digest=instances.digest if instances else "",
    ).returning(Job.id)).scalar_one())


def job_covering(conn: Connection, series_pk: int, model: str, strength: float, digest: str) -> Any:
    """The series' newest job when it already covers exactly these instances with this model and strength.

    Only a job that is queued, running or succeeded counts: after a failed or cancelled one a re-send is a new try.
    Returns the job row, or ``None`` when the series needs a new job.
    """
    latest = conn.execute(select(Job.__table__).where(Job.series_pk == series_pk)
                          .order_by(Job.version.desc()).limit(1)).first()
    if latest is None or not digest:
        return None
    same = (latest.instances_digest == digest and latest.model == model
            and abs(float(latest.strength) - float(strength)) < 1e-6)
    live = latest.state in (JobState.queued, JobState.running, JobState.succeeded)
    return latest if same and live else None


def supersede_queued_jobs(conn: Connection, series_pk: int, job_pk: int, version: int, now: dt.datetime) -> list[int]:
    """Cancel the series' queued jobs of older versions: version ``version`` (job ``job_pk``) covers their instances.

    A job already running is left to finish: it denoises exactly its own instances, under the same derived
    series UID, so PACS still holds one derived series. Returns the keys of the jobs cancelled.
    """
    ids = list(conn.execute(select(Job.id).where(Job.series_pk == series_pk, Job.version < version,
                                                 Job.state == JobState.queued)).scalars())
    if ids:
        conn.execute(update(Job).where(Job.id.in_(ids), Job.state == JobState.queued).values(
            state=JobState.cancelled, finished_at=now, worker_id="",
            last_error=f"superseded by version {version} (job {job_pk}) before it started"))
    return ids


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
    #: The version's last instance key (``None``: a job queued before versions were fixed; takes every instance).
    last_instance_pk: int | None = None


def claim_job(conn: Connection, worker_id: str, now: dt.datetime) -> ClaimedJob | None:
    """Atomically take the oldest runnable queued job, or return ``None``."""
    row = conn.execute(text(
        "UPDATE jobs SET state = 'running', worker_id = :worker, attempts = attempts + 1, started_at = :now, "
        "heartbeat_at = :now WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND not_before <= :now "
        f"ORDER BY id LIMIT 1{_skip_locked(conn)}) "
        "RETURNING id, series_pk, version, rule, model, strength, attempts, last_instance_pk"
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


def fail_job(conn: Connection, job_id: int, reason: str, now: dt.datetime, retry_at: dt.datetime | None,
             worker_id: str | None = None) -> bool:
    """Record a failure: back to ``queued`` at ``retry_at``, or ``failed`` for good when it is ``None``.

    With ``worker_id``, only while the job is still that worker's (as :func:`finish_job`): a worker whose job was
    cancelled or taken over meanwhile changes nothing. Returns whether the job was updated.
    """
    values: dict[str, Any] = {"last_error": reason[:4000], "worker_id": ""}
    if retry_at is None:
        values.update(state=JobState.failed, finished_at=now)
    else:
        values.update(state=JobState.queued, not_before=retry_at)
    condition = [Job.id == job_id, Job.state == JobState.running]
    if worker_id is not None:
        condition.append(Job.worker_id == worker_id)
    return conn.execute(update(Job).where(*condition).values(**values)).rowcount == 1


def requeue_stalled_jobs(conn: Connection, now: dt.datetime, timeout_seconds: float) -> list[int]:
    """Put running jobs whose heartbeat is older than the timeout back in the queue; return their keys."""
    cutoff = now - dt.timedelta(seconds=timeout_seconds)
    ids = list(conn.execute(select(Job.id).where(Job.state == JobState.running, Job.heartbeat_at < cutoff)).scalars())
    if ids:
        conn.execute(update(Job).where(Job.id.in_(ids), Job.state == JobState.running).values(
            state=JobState.queued, worker_id="", not_before=now,
            last_error="worker stopped sending heartbeats; taken up again"))
    return ids


def series_instance_paths(conn: Connection, series_pk: int, up_to: int | None = None) -> list[str]:
    """Relative paths of a series' instances (with ``up_to``: only those with a key up to it, one version's)."""
    query = select(Instance.path).where(Instance.series_pk == series_pk)
    if up_to is not None:
        query = query.where(Instance.id <= up_to)
    return list(conn.execute(query.order_by(Instance.id)).scalars())


def series_instances(conn: Connection, series_pk: int, up_to: int | None = None) -> list[tuple[str, str]]:
    """``(SOPInstanceUID, relative path)`` of a series' instances in arrival order (``up_to``: one version's)."""
    query = select(Instance.sop_instance_uid, Instance.path).where(Instance.series_pk == series_pk)
    if up_to is not None:
        query = query.where(Instance.id <= up_to)
    return [(uid, path) for uid, path in conn.execute(query.order_by(Instance.id))]


def job_last_error(conn: Connection, job_id: int) -> str:
    """The job's last error ("" when none)."""
    return str(conn.execute(select(Job.last_error).where(Job.id == job_id)).scalar_one() or "")


def record_trust(conn: Connection, job_id: int, output_series_uid: str, score: float | None, verdict: str,
                 detail: str) -> None:
    """Store a job's derived series UID and its trust check (score, verdict, JSON detail)."""
    conn.execute(update(Job).where(Job.id == job_id).values(
        output_series_uid=output_series_uid, trust_score=score, trust_verdict=verdict, trust_detail=detail))


def derived_series_uids(conn: Connection, series_pk: int) -> list[str]:
    """The derived series UIDs of a source series' succeeded jobs, oldest first, each once."""
    uids = conn.execute(
        select(Job.output_series_uid).where(Job.series_pk == series_pk, Job.state == JobState.succeeded,
                                            Job.output_series_uid != "").order_by(Job.id)).scalars()
    return list(dict.fromkeys(uids))


def receiving_series_routes(conn: Connection) -> list[tuple[int, str, dt.datetime]]:
    """``(series key, rule, last received)`` of each series still receiving; the rule is the one the assembler
    recorded for it ("" when none matched), so readers need not route it again."""
    rows = conn.execute(select(Series.id, Series.route_rule, Series.last_received_at)
                        .where(Series.state == SeriesState.receiving))
    return [(pk, rule, last) for pk, rule, last in rows]


def receiving_series(conn: Connection, quiet_since: dt.datetime | None = None) -> list[Any]:
    """Rows of the series still receiving, longest quiet first; with ``quiet_since``, only those whose last
    instance arrived at or before it."""
    query = select(Series.__table__).where(Series.state == SeriesState.receiving)
    if quiet_since is not None:
        query = query.where(Series.last_received_at <= quiet_since)
    return list(conn.execute(query.order_by(Series.last_received_at)).all())


def complete_series(conn: Connection, series_pk: int, quiet_since: dt.datetime, now: dt.datetime, rule: str,
                    note: str) -> bool:
    """Mark a receiving series complete with its rule and routing note; ``False`` when an instance arrived after
    ``quiet_since`` meanwhile (the series stays receiving) or it is no longer receiving."""
    result = conn.execute(
        update(Series).where(Series.id == series_pk, Series.state == SeriesState.receiving,
                             Series.last_received_at <= quiet_since)
        .values(state=SeriesState.complete, completed_at=now, completion_count=Series.completion_count + 1,
                route_rule=rule, route_note=note)
    )
    return result.rowcount == 1


def set_route(conn: Connection, series_pk: int, *, rule: str | None = None, note: str | None = None) -> None:
    """Record the rule a series matches and/or the note shown beside it (what routing decided, and why)."""
    values = {key: value for key, value in (("route_rule", rule), ("route_note", note)) if value is not None}
    if values:
        conn.execute(update(Series).where(Series.id == series_pk).values(**values))


def series_with_open_jobs(conn: Connection) -> set[int]:
    """Keys of the series with a queued or running job."""
    return set(conn.execute(select(Job.series_pk).where(Job.state.in_([JobState.queued, JobState.running])))
               .scalars())


# ------------------------------------------------------------------------------------------------- exports


def enqueue_export(conn: Connection, series_uid: str, destination: str, instances: list[tuple[str, str]],
                   now: dt.datetime, job_pk: int | None = None) -> int:
    """Queue sending ``instances`` (SOP Instance UID, relative path) to ``destination``; return the key.

    Instances that ``destination`` already accepted for ``series_uid`` in an earlier export (a series that grew
    after a version was sent, re-denoised as a whole) are recorded with that answer, "delivered by export N",
    and not sent again: the PACS holds them under the same SOP Instance UIDs, and some PACS answer a second
    copy with a failure, which would fail the new export for nothing.
    """
    export_pk = int(conn.execute(insert(Export).values(
        job_pk=job_pk, series_uid=series_uid, destination=destination, state=ExportState.queued, attempts=0,
        not_before=now, created_at=now,
    ).returning(Export.id)).scalar_one())
    delivered = delivered_instances(conn, series_uid, destination, export_pk)
    if instances:
        conn.execute(insert(ExportInstance), [
            {"export_pk": export_pk, "sop_instance_uid": uid, "path": path, "error": "", "status": None,
             "sent_at": None} if uid not in delivered else
            {"export_pk": export_pk, "sop_instance_uid": uid, "path": path,
             "error": f"delivered by export {delivered[uid][0]}", "status": delivered[uid][1],
             "sent_at": delivered[uid][2]}
            for uid, path in instances
        ])
    return export_pk


def delivered_instances(conn: Connection, series_uid: str, destination: str,
                        before_export: int) -> dict[str, tuple[int, int | None, dt.datetime | None]]:
    """SOP Instance UID -> (export, status, when) of the instances of ``series_uid`` that ``destination``
    accepted in exports older than ``before_export`` (the first acceptance of each)."""
    rows = conn.execute(
        select(ExportInstance.sop_instance_uid, Export.id, ExportInstance.status, ExportInstance.sent_at)
        .join(Export, Export.id == ExportInstance.export_pk)
        .where(Export.series_uid == series_uid, Export.destination == destination, Export.id < before_export,
               ExportInstance.status.in_(SUCCESS_STATUSES))
        .order_by(Export.id)).all()
    out: dict[str, tuple[int, int | None, dt.datetime | None]] = {}
    for uid, export, status, when in rows:
        out.setdefault(uid, (export, status, when))
    return out


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
    """Put a failed or cancelled job or export back in the queue with fresh attempts; ``False`` if not found.

    An export that is queued again after a failed attempt (retrying, waiting for its back-off) is tried now.
    """
    model = Job if kind == "job" else Export
    result = conn.execute(update(model).where(
        model.id == key, model.state.in_([JobState.failed.value, JobState.cancelled.value])
    ).values(state="queued", attempts=0, not_before=now, finished_at=None))
    if result.rowcount == 0 and kind == "export":
        result = conn.execute(update(Export).where(Export.id == key, Export.state == ExportState.queued,
                                                   Export.attempts > 0).values(not_before=now))
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


# ------------------------------------------------------------------------------------------------- process leases


@dataclass(frozen=True)
class ProcessIdentity:
    """One start of a node process: ``host:pid:token``, where the random token is never reused by a restart."""

    host: str
    pid: int
    token: str

    @classmethod
    def new(cls) -> ProcessIdentity:
        return cls(socket.gethostname(), os.getpid(), secrets.token_hex(8))

    def worker_id(self, role: str) -> str:
        """The id written into the jobs and exports this process claims (``host:pid:token:role``)."""
        return f"{self.host}:{self.pid}:{self.token}:{role}"


def claim_token(worker_id: str) -> str | None:
    """The process token of a claim's ``worker_id`` (``None`` for ids written before tokens existed)."""
    parts = worker_id.split(":")
    return parts[2] if len(parts) == 4 and parts[2] else None


def register_process(conn: Connection, me: ProcessIdentity, roles: str, now: dt.datetime,
                     lease_seconds: float) -> None:
    """Record this process start and its first lease."""
    conn.execute(insert(NodeProcess).values(token=me.token, host=me.host[:128], pid=me.pid, roles=roles[:64],
                                            started_at=now,
                                            lease_until=now + dt.timedelta(seconds=lease_seconds)))


def renew_lease(conn: Connection, me: ProcessIdentity, now: dt.datetime, lease_seconds: float) -> bool:
    """Extend this process's lease; ``False`` when its row is gone (it was taken for dead: stop claiming)."""
    result = conn.execute(update(NodeProcess).where(NodeProcess.token == me.token)
                          .values(lease_until=now + dt.timedelta(seconds=lease_seconds)))
    return result.rowcount == 1


def end_process(conn: Connection, me: ProcessIdentity) -> None:
    """Remove this process's lease at a clean stop: whatever it still held is taken over at once."""
    conn.execute(delete(NodeProcess).where(NodeProcess.token == me.token))


def requeue_orphans(conn: Connection, me: ProcessIdentity, now: dt.datetime) -> list[str]:
    """Requeue running jobs and exports claimed by process starts whose lease ran out or was ended.

    A claim is alive only while the lease of the process start that made it is: process ids are not used, since a
    restarted container is PID 1 again and would take its predecessor's claims for its own. Claims made before
    leases existed (``host:pid:role``) are taken over at once when they are from this host and that pid is ours or
    gone. Expired leases are removed. Returns ``"job N"`` / ``"export N"`` for each requeued one.
    """
    live = set(conn.execute(select(NodeProcess.token).where(NodeProcess.lease_until >= now)).scalars())
    live.add(me.token)
    requeued: list[str] = []
    for model, kind in ((Job, "job"), (Export, "export")):
        rows = conn.execute(select(model.id, model.worker_id).where(model.state == "running")).all()
        for key, worker_id in rows:
            token = claim_token(worker_id)
            if token is not None:
                if token in live:
                    continue
                reason = f"process {worker_id} stopped renewing its lease; taken up again"
            elif not _legacy_claim_is_dead(worker_id, me):
                continue
            else:
                reason = f"process {worker_id} ended while running it; taken up again"
            result = conn.execute(update(model).where(model.id == key, model.state == "running",
                                                      model.worker_id == worker_id).values(
                state="queued", worker_id="", not_before=now, last_error=reason))
            if result.rowcount == 1:
                requeued.append(f"{kind} {key}")
    conn.execute(delete(NodeProcess).where(NodeProcess.lease_until < now, NodeProcess.token != me.token))
    return requeued


def _legacy_claim_is_dead(worker_id: str, me: ProcessIdentity) -> bool:
    """A ``host:pid:role`` claim from before leases: dead when from this host and the pid is ours or gone."""
    parts = worker_id.split(":")
    if len(parts) < 2 or parts[0] != me.host:
        return False  # another host's: left to the stall timeout, as before
    try:
        pid = int(parts[1])
    except ValueError:
        return True
    if pid == me.pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
