"""The assembling stage: decide when a series is complete.

A series is complete when no instance arrived for the quiet time. Completion is recorded in the job table
(``series.state``, ``completed_at``, ``completion_count``), where the routing and worker stages pick it up.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Engine

from dicom_node.store.database import utcnow
from dicom_node.store.repository import CompletedSeries, complete_quiet_series

LOGGER = logging.getLogger(__name__)


def assemble_once(engine: Engine, quiet_seconds: float) -> list[CompletedSeries]:
    """Mark complete every series quiet for ``quiet_seconds``; return them (one transaction)."""
    with engine.begin() as conn:
        completed = complete_quiet_series(conn, utcnow(), quiet_seconds)
    for series in completed:
        LOGGER.info("series %s complete: %d instance(s), version %d", series.series_uid,
                    series.instance_count, series.completion_count)
    return completed


class Assembler(threading.Thread):
    """Background thread running :func:`assemble_once` every ``poll_seconds`` until ``stop`` is set."""

    def __init__(self, engine: Engine, quiet_seconds: float, stop: threading.Event, poll_seconds: float = 1.0):
        super().__init__(name="assembler", daemon=True)
        self.engine = engine
        self.quiet_seconds = quiet_seconds
        self.stop_event = stop
        self.poll_seconds = poll_seconds

    def run(self) -> None:
        while not self.stop_event.wait(self.poll_seconds):
            try:
                assemble_once(self.engine, self.quiet_seconds)
            except Exception:  # the database may be briefly unavailable; try again next round
                LOGGER.exception("assembling failed; retrying")
