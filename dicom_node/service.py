"""``dicom-node serve``: prepares storage and runs the stages in one process until a signal stops it.

A process runs every stage (role ``all``, the default) or only some of them (``--role receive,worker``), so a
site can run receivers, one worker per GPU, exporters and the dashboard as separate processes on several hosts
against one PostgreSQL database and a shared data directory. Roles:

``receive``  the C-STORE SCP, spool re-indexing at start-up, and the assembler that completes and routes series
``worker``   the denoising worker (claims jobs with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL)
``export``   one exporter per destination and the sweeper that requeues stalled exports
``web``      the dashboard, ``/metrics`` with job-table metrics, ``/healthz`` and ``/readyz``

Processes without the ``web`` role still serve ``/metrics``, ``/healthz`` and ``/readyz`` (their own counters)
on ``web.port`` when it is not 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable

from sqlalchemy import Engine

from dicom_node import __version__
import socket

from dicom_node.assemble import Assembler
from dicom_node.config import Config
from dicom_node.cpu_memory import keep_freed_memory
from dicom_node.doorbell import Doorbell
from dicom_node.export import Exporter, StalledExportSweeper, destinations_to_serve
from dicom_node.retention import RetentionSweeper
from dicom_node.receive import Receiver, reindex_spool, start_scp
from dicom_node.store.database import make_engine, migrate, utcnow
from dicom_node.store.queue import requeue_orphans
from dicom_node.store.spool import Spool

LOGGER = logging.getLogger(__name__)

#: The stages a process can run; ``all`` is every one of them.
ROLES = ("receive", "worker", "export", "web")


def parse_roles(values: Iterable[str]) -> frozenset[str]:
    """Turn ``--role`` values (repeatable, comma-separated, ``all``) into a set of roles.

    Raises
    ------
    ValueError
        Naming an unknown role.
    """
    roles: set[str] = set()
    for value in values:
        for part in value.split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part == "all":
                roles.update(ROLES)
            elif part in ROLES:
                roles.add(part)
            else:
                raise ValueError(f"unknown role {part!r} (known: {', '.join(ROLES)}, all)")
    return frozenset(roles or ROLES)


def open_storage(cfg: Config) -> tuple[Engine, Spool]:
    """Create the data directory, open the database and bring its schema up to date."""
    cfg.data_path.mkdir(parents=True, exist_ok=True)
    (cfg.outbox_path).mkdir(parents=True, exist_ok=True)
    spool = Spool(cfg.spool_path)
    engine = make_engine(cfg.database_url)
    migrate(engine)
    return engine, spool


@dataclass
class Node:
    """A running node: storage, the SCP and the background stages."""

    cfg: Config
    roles: frozenset[str] = frozenset(ROLES)
    stop_event: threading.Event = field(default_factory=threading.Event)
    engine: Engine | None = None
    receiver: Receiver | None = None
    server: Any = None
    web: Any = None
    models: Any = None
    threads: list[threading.Thread] = field(default_factory=list)
    #: Rung by the assembler when it queues a job, and by the worker when it queues exports (see doorbell.py).
    jobs_bell: Doorbell = field(default_factory=Doorbell)
    exports_bell: Doorbell = field(default_factory=Doorbell)

    def start(self) -> None:
        """Open storage, re-index the spool, take up orphaned work, start the stages of this process's roles."""
        runs_models = "worker" in self.roles and self.cfg.worker.enabled
        if runs_models and self.cfg.models.keep_freed_cpu_memory:
            keep_freed_memory()  # before any thread starts: a thread keeps the malloc arena it first used
        engine, spool = open_storage(self.cfg)
        self.engine = engine
        from dicom_node import audit

        with engine.begin() as conn:
            audit.record_config(conn, self.cfg, utcnow())
        if "receive" in self.roles:
            self.receiver = Receiver(spool, engine, int(self.cfg.node.min_free_disk_gb * 1024**3))
            reindex_spool(self.receiver)
        with engine.begin() as conn:
            orphans = requeue_orphans(conn, socket.gethostname(), utcnow())
        if orphans:
            LOGGER.warning("taken up again after a crash: %s", ", ".join(orphans))
        worker_id = f"{socket.gethostname()}:{os.getpid()}"
        threads: list[threading.Thread] = []
        if "receive" in self.roles:
            threads.append(Assembler(engine, self.cfg, self.stop_event, jobs_bell=self.jobs_bell,
                                     exports_bell=self.exports_bell))
            threads.append(audit.AuditPurger(self.cfg, engine, self.stop_event))
            threads.append(RetentionSweeper(self.cfg, engine, self.stop_event))
        if runs_models:
            from dicom_node.worker import ModelCache, Worker

            self.models = ModelCache(self.cfg)
            threads.append(Worker(self.cfg, engine, self.stop_event, f"{worker_id}:worker", models=self.models,
                                  jobs_bell=self.jobs_bell, exports_bell=self.exports_bell))
        if "export" in self.roles:
            for destination in destinations_to_serve(self.cfg):
                threads.append(Exporter(self.cfg, engine, destination, self.stop_event, f"{worker_id}:export",
                                        bell=self.exports_bell))
            threads.append(StalledExportSweeper(self.cfg, engine, self.stop_event))
        for thread in threads:
            thread.start()
        self.threads.extend(threads)
        if "receive" in self.roles:
            assert self.receiver is not None
            _, self.server = start_scp(self.cfg, self.receiver)
            _count_associations(self.server)
        if self.cfg.web.port:
            from dicom_node.web.server import start_web

            try:
                self.web = start_web(self)
            except OSError as exc:
                if "web" in self.roles:
                    raise
                LOGGER.warning("cannot serve /metrics on %s:%d (%s); set web.port per process or 0",
                               self.cfg.web.bind_address, self.cfg.web.port, exc.strerror or exc)
        LOGGER.info("dicom-node %s started (roles %s): data in %s, database %s", __version__,
                    ",".join(r for r in ROLES if r in self.roles), self.cfg.data_path,
                    self.cfg.database_url.split("://")[0])

    def stop(self) -> None:
        """Stop accepting associations, finish the current ones and stop the stages."""
        self.stop_event.set()
        self.jobs_bell.ring()  # waiting stages notice the stop now, not at their next poll
        self.exports_bell.ring()
        if self.server is not None:
            self.server.shutdown()
        if self.web is not None:
            self.web.shutdown()
        for thread in self.threads:
            thread.join(timeout=10)
        if self.engine is not None:
            self.engine.dispose()
        LOGGER.info("dicom-node stopped")


def _count_associations(server: Any) -> None:
    """Count associations for ``/metrics`` (bound to the running server; the receive module stays untouched)."""
    from pynetdicom import evt

    from dicom_node import metrics

    for event, outcome in ((evt.EVT_ACCEPTED, "accepted"), (evt.EVT_REJECTED, "rejected"),
                           (evt.EVT_ABORTED, "aborted"), (evt.EVT_RELEASED, "released")):
        server.bind(event, lambda _event, outcome=outcome: metrics.count_association(outcome))


def serve(cfg: Config, roles: frozenset[str] = frozenset(ROLES)) -> int:
    """Run the node in the foreground until SIGINT or SIGTERM; return the exit status.

    The server runs with ``block=False`` and is shut down from this (main) thread: calling ``shutdown`` from a
    signal handler while ``start_server(block=True)`` runs deadlocks in pynetdicom.
    """
    node = Node(cfg, roles)
    node.start()

    def _on_signal(signum: int, _frame: Any) -> None:
        LOGGER.info("received %s, shutting down", signal.Signals(signum).name)
        node.stop_event.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        while not node.stop_event.wait(1.0):
            pass
    finally:
        node.stop()
    return 0
