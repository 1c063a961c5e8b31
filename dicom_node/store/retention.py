"""Retention: remove the files of series the node no longer needs, never those of undelivered work.

A complete series is purged (its spool files, its jobs' outbox folders and its instance rows; the series row stays,
in state ``purged``, for the record) when

- it matched no rule (or was the node's own output) and completed more than ``retention.unrouted_days`` ago, or
- every job of it succeeded or was cancelled, every export of it and of its derived series succeeded or was
  cancelled, and it completed more than ``retention.processed_days`` ago.

A series with a queued, running or failed job or export is always kept: an operator may still retry it. A day
count of 0 keeps series of that kind forever. A late instance of a purged series starts it receiving again.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import threading
from pathlib import Path

from sqlalchemy import Connection, Engine, delete, select, update

from dicom_node.config import Config
from dicom_node.store.database import utcnow
from dicom_node.store.periodic import PeriodicTask
from dicom_node.store.schema import Export, Instance, Job, Series, SeriesState

LOGGER = logging.getLogger(__name__)

DONE = ("succeeded", "cancelled")


def _purgeable(conn: Connection, series: object) -> bool:
    jobs = conn.execute(select(Job.id, Job.state, Job.output_series_uid)
                        .where(Job.series_pk == series.id)).all()  # type: ignore[attr-defined]
    if any(j.state.value not in DONE for j in jobs):
        return False
    uids = [series.series_uid] + [j.output_series_uid for j in jobs if j.output_series_uid]  # type: ignore[attr-defined]
    job_ids = [j.id for j in jobs]
    exports = conn.execute(select(Export.state).where(
        (Export.series_uid.in_(uids)) | (Export.job_pk.in_(job_ids) if job_ids else False))).scalars().all()
    return all(state.value in DONE for state in exports)


def purge_once(engine: Engine, cfg: Config, now: dt.datetime | None = None) -> list[str]:
    """Purge every series whose retention ran out; return their Series Instance UIDs."""
    now = now or utcnow()
    ret = cfg.retention
    purged: list[str] = []
    with engine.begin() as conn:
        rows = conn.execute(select(Series.__table__).where(Series.state == SeriesState.complete)).all()
        for series in rows:
            unrouted = not series.route_rule
            days = ret.unrouted_days if unrouted else ret.processed_days
            if days <= 0 or series.completed_at is None or series.completed_at > now - dt.timedelta(days=days):
                continue
            if not unrouted and not _purgeable(conn, series):
                continue
            paths = list(conn.execute(select(Instance.path).where(Instance.series_pk == series.id)).scalars())
            job_ids = list(conn.execute(select(Job.id).where(Job.series_pk == series.id)).scalars())
            result = conn.execute(update(Series).where(Series.id == series.id, Series.state == SeriesState.complete)
                                  .values(state=SeriesState.purged))
            if result.rowcount != 1:
                continue  # an instance arrived meanwhile
            conn.execute(delete(Instance).where(Instance.series_pk == series.id))
            _remove_files(cfg, paths, job_ids)
            purged.append(series.series_uid)
    for uid in purged:
        LOGGER.info("series %s purged: retention period over and nothing left to deliver", uid)
    return purged


def _remove_files(cfg: Config, paths: list[str], job_ids: list[int]) -> None:
    folders: set[Path] = set()
    for rel in paths:
        path = cfg.data_path / rel
        path.unlink(missing_ok=True)
        folders.add(path.parent)
    for folder in folders:  # remove the series folder, and the study folder when it is empty
        for candidate in (folder, folder.parent):
            try:
                candidate.rmdir()
            except OSError:
                break
    for job_id in job_ids:
        shutil.rmtree(cfg.outbox_path / f"job-{job_id}", ignore_errors=True)


class RetentionSweeper(PeriodicTask):
    """Runs :func:`purge_once` at start and then every ``interval`` seconds until ``stop`` is set."""

    def __init__(self, cfg: Config, engine: Engine, stop: threading.Event, interval: float = 600.0) -> None:
        super().__init__("retention", lambda: purge_once(engine, cfg), stop, interval)
