"""The audit log: configuration changes, logins, operator actions and every series received, processed, exported.

Each event has a time, an actor (``user:NAME``, ``token:NAME``, ``cli:USER``, or the process ``host:pid:role``), an
action, the object's kind and key, and UIDs; never patient names or IDs. Events are written in the caller's
transaction, so an action and its audit entry commit together. ``audit.retention_days`` bounds how long they are
kept (:class:`AuditPurger`). Read them with ``dicom-node audit`` or on the dashboard's audit page.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import hashlib
import json
import logging
import threading
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, select

from dicom_node.config import Config
from dicom_node.store.database import utcnow
from dicom_node.store.periodic import PeriodicTask
from dicom_node.store.schema import AuditEvent

LOGGER = logging.getLogger(__name__)

#: Actions that record the configuration a process runs with (a reload records the running one after it).
CONFIG_ACTIONS = ("config.loaded", "config.changed", "config.reloaded")


def record(conn: Connection, action: str, actor: str, now: dt.datetime, *, object_kind: str = "",
           object_id: int | None = None, study_uid: str = "", series_uid: str = "", detail: str = "") -> None:
    """Append one event (in the caller's transaction)."""
    conn.execute(insert(AuditEvent).values(
        at=now, actor=actor[:128], action=action[:64], object_kind=object_kind[:16], object_id=object_id,
        study_uid=study_uid[:64], series_uid=series_uid[:64], detail=detail[:4000]))


def cli_actor() -> str:
    """The actor of a command-line action: ``cli:<login name>``."""
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli:unknown"


def section_hashes(cfg: Config) -> dict[str, str]:
    """A short hash of each section's values (never the values: they may hold password hashes)."""
    data = dataclasses.asdict(cfg)
    data.pop("source", None)
    return {key: hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for key, value in sorted(data.items())}


def record_config(conn: Connection, cfg: Config, now: dt.datetime) -> bool:
    """Record the configuration a process starts with when it differs from the last one recorded.

    The detail lists the changed sections (``web``, ``rules``...) and a hash per section, never values (they may
    hold password hashes). Returns whether an event was written.
    """
    hashes = section_hashes(cfg)
    last = conn.execute(select(AuditEvent.detail).where(AuditEvent.action.in_(CONFIG_ACTIONS))
                        .order_by(AuditEvent.id.desc()).limit(1)).scalar()
    previous: dict[str, str] = {}
    if last:
        try:
            previous = json.loads(last).get("sections", {})
        except (ValueError, AttributeError):
            previous = {}
    if previous == hashes:
        return False
    changed = sorted(k for k in hashes if previous.get(k) != hashes[k]) if previous else []
    detail = json.dumps({"source": cfg.source, "changed": changed, "sections": hashes})
    action = "config.changed" if previous else "config.loaded"
    record(conn, action, f"file:{cfg.source}", now, object_kind="config", detail=detail)
    if previous:
        LOGGER.info("configuration changed since the last start: %s", ", ".join(changed))
    return True


def query(conn: Connection, *, since: dt.datetime | None = None, action: str | None = None,
          actor: str | None = None, uid: str | None = None, limit: int = 100) -> list[Any]:
    """Events newest first; ``action`` matches a prefix (``series.`` finds every series event)."""
    q = select(AuditEvent.__table__).order_by(AuditEvent.id.desc()).limit(limit)
    if since is not None:
        q = q.where(AuditEvent.at >= since)
    if action:
        q = q.where(AuditEvent.action.startswith(action))
    if actor:
        q = q.where(AuditEvent.actor == actor)
    if uid:
        q = q.where((AuditEvent.series_uid == uid) | (AuditEvent.study_uid == uid))
    return list(conn.execute(q).all())


def purge(conn: Connection, now: dt.datetime, retention_days: float) -> int:
    """Delete events older than ``retention_days`` (0 keeps everything); return how many."""
    if retention_days <= 0:
        return 0
    cutoff = now - dt.timedelta(days=retention_days)
    return int(conn.execute(delete(AuditEvent).where(AuditEvent.at < cutoff)).rowcount or 0)


class AuditPurger(PeriodicTask):
    """Applies ``audit.retention_days`` at start and then every ``interval`` seconds until ``stop`` is set."""

    def __init__(self, cfg: Config, engine: Engine, stop: threading.Event, interval: float = 3600.0) -> None:
        super().__init__("audit-purger", self.purge_once, stop, interval)
        self.cfg, self.engine = cfg, engine

    def purge_once(self) -> int:
        with self.engine.begin() as conn:
            removed = purge(conn, utcnow(), self.cfg.audit.retention_days)
        if removed:
            LOGGER.info("audit log: removed %d event(s) older than %g days", removed, self.cfg.audit.retention_days)
        return removed
