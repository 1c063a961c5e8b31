"""This process's lease in the job table, and taking over the work of processes whose lease ran out.

Every ``serve`` process registers a random start token (:class:`~dicom_node.store.queue.ProcessIdentity`) and
renews its lease every third of ``worker.lease_seconds``. The jobs and exports it claims carry the token in their
``worker_id``. A process killed with ``kill -9`` stops renewing; once its lease has run out, any live process (its
own successor included) puts its running work back in the queue. Process ids play no part, so this holds in
containers, where every node is PID 1, and across hosts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from sqlalchemy import Engine

from dicom_node.store.database import utcnow
from dicom_node.store.doorbell import Doorbell
from dicom_node.store.periodic import PeriodicTask
from dicom_node.store.queue import ProcessIdentity, end_process, register_process, renew_lease, requeue_orphans

LOGGER = logging.getLogger(__name__)


def start_lease(engine: Engine, me: ProcessIdentity, roles: str, lease_seconds: float) -> list[str]:
    """Register this process start and take over work whose owner's lease has already run out.

    Returns what was taken over (``"job N"``, ``"export N"``), for the start-up log.
    """
    now = utcnow()
    with engine.begin() as conn:
        register_process(conn, me, roles, now, lease_seconds)
        return requeue_orphans(conn, me, now)


def stop_lease(engine: Engine, me: ProcessIdentity) -> None:
    """End the lease at a clean stop, so that whatever this process still held is taken over at once."""
    try:
        with engine.begin() as conn:
            end_process(conn, me)
    except Exception:  # the database may be gone at shutdown; the lease then simply runs out
        LOGGER.warning("could not end this process's lease; it runs out by itself", exc_info=True)


class LeaseKeeper(PeriodicTask):
    """Renews the lease and requeues orphaned work every third of the lease, ringing the stages' bells."""

    def __init__(self, engine: Engine, me: ProcessIdentity, roles: str, lease_seconds: float,
                 stop: threading.Event, bells: Iterable[Doorbell] = ()) -> None:
        super().__init__("lease", self.renew_and_sweep, stop, lease_seconds / 3)
        self.engine = engine
        self.me = me
        self.roles = roles
        self.lease_seconds = lease_seconds
        self.bells = list(bells)

    def renew_and_sweep(self) -> list[str]:
        """One round: renew (re-register if the row was removed meanwhile), then take over orphaned work."""
        now = utcnow()
        with self.engine.begin() as conn:
            if not renew_lease(conn, self.me, now, self.lease_seconds):
                # Taken for dead (the database was unreachable for longer than the lease): what this process was
                # running has been requeued and its finish will be refused; from now on it claims afresh.
                LOGGER.warning("this process's lease had run out and was removed; registering again")
                register_process(conn, self.me, self.roles, now, self.lease_seconds)
            requeued = requeue_orphans(conn, self.me, now)
        if requeued:
            LOGGER.warning("taken up again from processes whose lease ran out: %s", ", ".join(requeued))
            for bell in self.bells:
                bell.ring()
        return requeued
