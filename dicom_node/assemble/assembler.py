"""The assembling stage: decide when a series is complete and what happens to it.

A series is complete when no instance arrived for its quiet time (the matching rule's, else ``node.quiet_seconds``).
At completion it is routed: a job is queued for the rule's model, exports of the original are queued when the rule
forwards it, and a series that matches no rule (or is the node's own output) is kept with a note saying why. All of
it happens in one transaction, so a crash never leaves a complete series without its job.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass

from sqlalchemy import Connection, Engine

from dicom_node.assemble.routing import SeriesAttributes, min_quiet_seconds, route
from dicom_node.config import LOCAL_DESTINATION, Config
from dicom_node.ops import metrics
from dicom_node.store import audit
from dicom_node.store.database import utcnow
from dicom_node.store.doorbell import Doorbell
from dicom_node.store.queue import (
    complete_series,
    enqueue_export,
    enqueue_job,
    job_covering,
    receiving_series,
    series_instances,
    set_route,
    supersede_queued_jobs,
    version_instances,
)

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """A series that became complete in this pass, and what was decided for it."""

    series_pk: int
    series_uid: str
    version: int
    instance_count: int
    rule: str
    job_pk: int | None
    note: str


def assemble_once(engine: Engine, cfg: Config, now: dt.datetime | None = None) -> list[Completion]:
    """Complete and route every series that has been quiet long enough (one transaction)."""
    now = now or utcnow()
    shortest = min_quiet_seconds(cfg.rules, cfg.node.quiet_seconds)
    done: list[Completion] = []
    with engine.begin() as conn:
        record_routes(conn, cfg)
        for series in receiving_series(conn, quiet_since=now - dt.timedelta(seconds=shortest)):
            decision = route(cfg.rules, SeriesAttributes.from_row(series))
            quiet = cfg.node.quiet_seconds
            if decision.rule is not None and decision.rule.quiet_seconds is not None:
                quiet = decision.rule.quiet_seconds
            cutoff = now - dt.timedelta(seconds=quiet)
            if series.last_received_at > cutoff:
                continue
            rule_name = decision.rule.name if decision.rule else ""
            # Guarded by state and time, so an instance arriving meanwhile keeps the series receiving.
            if not complete_series(conn, series.id, cutoff, now, rule_name, decision.note):
                continue
            version = series.completion_count + 1
            instances = series_instances(conn, series.id)
            job_pk = None
            note = decision.note
            rule = decision.rule
            if rule is not None and rule.model:
                job_pk, note = _queue_version(conn, series.id, version, rule.name, rule.model, rule.strength, now)
                if job_pk is None:  # nothing new: say so where the series is shown
                    set_route(conn, series.id, note=note)
            if rule is not None and rule.forward_original:
                for destination in rule.destinations or [LOCAL_DESTINATION]:
                    enqueue_export(conn, series.series_uid, destination, instances, now)
            audit.record(conn, "series.received", "node:assemble", now, object_kind="series", object_id=series.id,
                         series_uid=series.series_uid,
                         detail=f"{len(instances)} instances, version {version}, rule {rule_name or 'none'}"
                                + (f", job {job_pk}" if job_pk is not None else "")
                                + (f"; {note}" if note and rule is not None and rule.model else ""))
            receiving_since = series.receiving_since or series.first_received_at
            metrics.observe_stage("receive", (series.last_received_at - receiving_since).total_seconds())
            done.append(Completion(series.id, series.series_uid, version, len(instances), rule_name, job_pk, note))
    for c in done:
        if c.job_pk is not None:
            LOGGER.info("series %s complete (%d instances, version %d): rule %s, job %d queued%s", c.series_uid,
                        c.instance_count, c.version, c.rule, c.job_pk, f"; {c.note}" if c.note else "")
        elif c.rule and c.note:
            LOGGER.info("series %s complete (%d instances, version %d): rule %s: %s", c.series_uid,
                        c.instance_count, c.version, c.rule, c.note)
        elif c.rule:
            LOGGER.info("series %s complete (%d instances, version %d): rule %s forwards it", c.series_uid,
                        c.instance_count, c.version, c.rule)
        else:
            LOGGER.info("series %s complete (%d instances, version %d): not routed: %s", c.series_uid,
                        c.instance_count, c.version, c.note)
    return done


def record_routes(conn: Connection, cfg: Config) -> int:
    """Record in ``route_rule`` the rule each series still receiving matches now; return how many changed.

    The routing decision is the assembler's: the worker reads it to read ahead the headers of series a model
    will get, instead of routing them itself. Recorded again on every pass, so a reloaded configuration counts.
    """
    changed = 0
    for series in receiving_series(conn):
        decision = route(cfg.rules, SeriesAttributes.from_row(series))
        name = decision.rule.name if decision.rule else ""
        if name != series.route_rule:
            set_route(conn, series.id, rule=name)
            changed += 1
    return changed


def _queue_version(conn: Connection, series_pk: int, version: int, rule: str, model: str, strength: float,
                   now: dt.datetime) -> tuple[int | None, str]:
    """Queue the job of a new version of a series, unless an earlier job already covers the same instances.

    Returns the new job's key (``None`` when none was needed) and a note for the log, the audit and the dashboard.
    A queued job of an older version is cancelled: the new one covers all its instances, under the same derived
    series UID (see :func:`dicom_node.denoise.derived.derived_series_uid`), so the older one would only send a
    subset of the same series again.
    """
    covered = version_instances(conn, series_pk)
    earlier = job_covering(conn, series_pk, model, strength, covered.digest)
    if earlier is not None:
        return None, (f"unchanged re-send: the same {covered.count} instances as version {earlier.version} "
                      f"(job {earlier.id}, {earlier.state.value}); no new job")
    job_pk = enqueue_job(conn, series_pk, version, rule, model, strength, now, covered)
    superseded = supersede_queued_jobs(conn, series_pk, job_pk, version, now)
    for old in superseded:
        audit.record(conn, "job.superseded", "node:assemble", now, object_kind="job", object_id=old,
                     detail=f"superseded by version {version} (job {job_pk}) before it started")
    return job_pk, (f"supersedes queued job {', '.join(map(str, superseded))}" if superseded else "")


def seconds_until_next_due(engine: Engine, cfg: Config, now: dt.datetime | None = None) -> float | None:
    """Seconds until the next receiving series has been quiet for its rule's quiet time (``None``: none waits).

    Lets the assembler wake when a series falls due rather than up to a whole poll interval later.
    """
    now = now or utcnow()
    with engine.connect() as conn:
        receiving = receiving_series(conn)
    due = None
    for series in receiving:
        decision = route(cfg.rules, SeriesAttributes.from_row(series))
        quiet = cfg.node.quiet_seconds
        if decision.rule is not None and decision.rule.quiet_seconds is not None:
            quiet = decision.rule.quiet_seconds
        left = (series.last_received_at + dt.timedelta(seconds=quiet) - now).total_seconds()
        due = left if due is None else min(due, left)
    return due


class Assembler(threading.Thread):
    """Background thread running :func:`assemble_once` until ``stop`` is set.

    It runs every ``poll_seconds``, or sooner when a series falls due before that. When it queues a job it rings
    ``jobs_bell`` (the worker's), and ``exports_bell`` when it queues exports of an original series.
    """

    def __init__(self, engine: Engine, cfg: Config, stop: threading.Event, poll_seconds: float = 1.0,
                 jobs_bell: Doorbell | None = None, exports_bell: Doorbell | None = None) -> None:
        super().__init__(name="assembler", daemon=True)
        self.engine = engine
        self.cfg = cfg
        self.stop_event = stop
        self.poll_seconds = poll_seconds
        self.jobs_bell = jobs_bell
        self.exports_bell = exports_bell

    def next_wait(self) -> float:
        """Seconds to sleep before the next pass: the poll interval, or less when a series falls due sooner."""
        due = seconds_until_next_due(self.engine, self.cfg)
        if due is None:
            return self.poll_seconds
        # A few milliseconds late, so the series is past its quiet time by the database's clock too.
        return min(self.poll_seconds, max(0.01, due + 0.005))

    def run(self) -> None:
        wait = self.poll_seconds
        while not self.stop_event.wait(wait):
            wait = self.poll_seconds
            try:
                done = assemble_once(self.engine, self.cfg)
                if self.jobs_bell is not None and any(c.job_pk is not None for c in done):
                    self.jobs_bell.ring()
                if self.exports_bell is not None and done:
                    self.exports_bell.ring()
                wait = self.next_wait()
            except Exception:  # the database may be briefly unavailable; try again next round
                LOGGER.exception("assembling failed; retrying")
