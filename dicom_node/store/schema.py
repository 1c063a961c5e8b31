"""The job table: patients, studies, series, instances, jobs and exports (SQLAlchemy 2 models).

Only UIDs and the few tags that routing, the dashboard and the logs need are stored; pixel data never enters the
database. Every change to these tables comes with an Alembic migration in ``store/migrations/versions``.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

UID = String(64)


class Base(DeclarativeBase):
    """Declarative base of every table."""


class SeriesState(str, enum.Enum):
    """Where a received series stands.

    ``receiving`` until no instance arrived for the quiet time, then ``complete``. A late instance puts a complete
    series back to ``receiving``; its next completion gets a higher ``completion_count`` (a new job version).
    ``purged`` once retention removed its files (see :mod:`dicom_node.store.retention`).
    """

    receiving = "receiving"
    complete = "complete"
    #: Complete, and its files were removed when its retention period ran out.
    purged = "purged"


class JobState(str, enum.Enum):
    """Job states (``queued -> running -> succeeded | failed | cancelled``)."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class ExportState(str, enum.Enum):
    """Export states, per destination and series."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings (no native ENUM type) so new states need no type migration on PostgreSQL.
    return Enum(cls, name=name, native_enum=False, length=16, validate_strings=True)


class Patient(Base):
    """A patient, keyed by Patient ID (and its issuer). Names stay here; logs never show them."""

    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patients_id_issuer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


class Study(Base):
    """A study (StudyInstanceUID)."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_pk: Mapped[int | None] = mapped_column(ForeignKey("patients.id"), nullable=True)
    study_date: Mapped[str] = mapped_column(String(8), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    #: Shown beside the study's exports and failures, so an administrator can tell studies apart without UIDs.
    study_description: Mapped[str] = mapped_column(String(64), default="", server_default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


class Series(Base):
    """A series (SeriesInstanceUID) with the tags routing rules match on."""

    __tablename__ = "series"
    __table_args__ = (Index("ix_series_state_last", "state", "last_received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    manufacturer: Mapped[str] = mapped_column(String(64), default="")
    image_type: Mapped[str] = mapped_column(String(128), default="")
    slice_thickness: Mapped[float | None] = mapped_column(Float, nullable=True)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    called_ae: Mapped[str] = mapped_column(String(16), default="")
    #: True when the series was made by a dicom-node (loop guard: never denoised again).
    is_node_output: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[SeriesState] = mapped_column(_enum(SeriesState, "series_state"), default=SeriesState.receiving)
    #: How many times the series became complete; a late instance makes the next completion a new version.
    completion_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime)
    #: When the current version began arriving: the first instance, or the first one after the last completion
    #: (so the "receive" time of a re-sent series is the re-send's, not counted from the first version).
    receiving_since: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    #: The rule that matched at the last completion ("" when none did); while the series is receiving, the rule
    #: it matches now (recorded by the assembler on each pass, read by the worker's read-ahead).
    route_rule: Mapped[str] = mapped_column(String(64), default="", server_default="")
    #: Why the series was not routed (no rule matched, loop guard), shown to administrators.
    route_note: Mapped[str] = mapped_column(Text, default="", server_default="")


class Instance(Base):
    """One received SOP instance and where its file lies (relative to the data directory)."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime)
    #: How many times this instance was received (re-sends are idempotent and counted).
    receive_count: Mapped[int] = mapped_column(Integer, default=1)


class Job(Base):
    """A denoising job: one version of one series, run by a worker."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("series_pk", "version", name="uq_jobs_series_version"),
        Index("ix_jobs_state_not_before", "state", "not_before"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"))
    version: Mapped[int] = mapped_column(Integer)
    rule: Mapped[str] = mapped_column(String(64), default="")
    model: Mapped[str] = mapped_column(String(64), default="")
    strength: Mapped[float] = mapped_column(Float, default=1.0)
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.queued)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[dt.datetime] = mapped_column(DateTime)
    worker_id: Mapped[str] = mapped_column(String(128), default="")
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    output_series_uid: Mapped[str] = mapped_column(UID, default="")
    #: The instances this version covers: those of the series with a key up to this one (instances are only ever
    #: added; a re-sent instance keeps its key). A job never denoises an instance that arrived after it was queued.
    last_instance_pk: Mapped[int | None] = mapped_column(Integer, nullable=True)
    instance_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: SHA-256 of the sorted SOP Instance UIDs of the version: an unchanged re-send has the same digest.
    instances_digest: Mapped[str] = mapped_column(String(64), default="", server_default="")
    #: The trust check of the derived series (dicom_node.denoise.trust): score in [0, 1], ``pass``/``warn``/
    #: ``fail`` ("" before a run), and its numbers as JSON.
    trust_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    trust_verdict: Mapped[str] = mapped_column(String(8), default="", server_default="")
    trust_detail: Mapped[str] = mapped_column(Text, default="", server_default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class NodeProcess(Base):
    """A running node process and its lease: its claims on jobs and exports are valid while the lease is.

    Each process start has a random token (``worker_id`` is ``host:pid:token:role``), so a restarted process never
    mistakes the claims of its dead predecessor for its own, even where every process is PID 1 (containers).
    """

    __tablename__ = "node_processes"

    token: Mapped[str] = mapped_column(String(32), primary_key=True)
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    roles: Mapped[str] = mapped_column(String(64), default="")
    started_at: Mapped[dt.datetime] = mapped_column(DateTime)
    #: Renewed every few seconds; once it has passed, the process is taken for dead and its work is taken over.
    lease_until: Mapped[dt.datetime] = mapped_column(DateTime, index=True)


class Export(Base):
    """Sending one series (derived, or the original when forwarded) to one destination."""

    __tablename__ = "exports"
    __table_args__ = (Index("ix_exports_state_not_before", "state", "not_before"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_pk: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)
    series_uid: Mapped[str] = mapped_column(UID)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[ExportState] = mapped_column(_enum(ExportState, "export_state"), default=ExportState.queued)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[dt.datetime] = mapped_column(DateTime)
    worker_id: Mapped[str] = mapped_column(String(128), default="")
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    sent_count: Mapped[int] = mapped_column(Integer, default=0)
    failed_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class ExportInstance(Base):
    """One instance of an export and the status the destination answered for it (PS3.4 B.2.3)."""

    __tablename__ = "export_instances"
    __table_args__ = (UniqueConstraint("export_pk", "sop_instance_uid", name="uq_export_instances"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    export_pk: Mapped[int] = mapped_column(ForeignKey("exports.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    #: The file to send, relative to the data directory.
    path: Mapped[str] = mapped_column(Text)
    #: The C-STORE response status; ``None`` until the destination answered.
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class AuditEvent(Base):
    """One audit log entry: who did what to which object, when (UIDs only, never patient names or IDs)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_at", "at"), Index("ix_audit_events_action_at", "action", "at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime)
    #: A dashboard user (``user:alice``), a token (``token:name``), a CLI user (``cli:root``) or a process.
    actor: Mapped[str] = mapped_column(String(128))
    #: What happened, e.g. ``login``, ``export.retry``, ``series.received``, ``config.changed``.
    action: Mapped[str] = mapped_column(String(64))
    #: The kind of object acted on (``job``, ``export``, ``series``, ``destination``, ``config``) and its key.
    object_kind: Mapped[str] = mapped_column(String(16), default="")
    object_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    study_uid: Mapped[str] = mapped_column(UID, default="")
    series_uid: Mapped[str] = mapped_column(UID, default="")
    detail: Mapped[str] = mapped_column(Text, default="")


class LoginThrottle(Base):
    """Failed dashboard logins of one user name or one client address, and its lock-out (``dicom_node.store.throttle``).

    Kept in the database so a lock-out survives a restart and holds for every web process of a site.
    """

    __tablename__ = "login_throttle"

    #: ``user`` or ``address``.
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    #: The user name as typed, or the client's IP address.
    subject: Mapped[str] = mapped_column(String(128), primary_key=True)
    #: Failures since ``window_start`` (reset when the window has passed, on a successful login, or at a lock-out).
    failures: Mapped[int] = mapped_column(Integer, default=0)
    window_start: Mapped[dt.datetime] = mapped_column(DateTime)
    last_failure_at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    #: Logins are refused until then; ``None`` when not locked.
    locked_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
