"""``dicom-node serve``: prepares storage and runs the stages in one process until a signal stops it."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from dicom_node import __version__
import socket

from dicom_node.assemble import Assembler
from dicom_node.config import Config
from dicom_node.export import Exporter, StalledExportSweeper, destinations_to_serve
from dicom_node.receive import Receiver, reindex_spool, start_scp
from dicom_node.store.database import make_engine, migrate, utcnow
from dicom_node.store.queue import requeue_orphans
from dicom_node.store.spool import Spool

LOGGER = logging.getLogger(__name__)


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
    stop_event: threading.Event = field(default_factory=threading.Event)
    engine: Engine | None = None
    receiver: Receiver | None = None
    server: Any = None
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        """Open storage, re-index the spool, take up orphaned work, start every stage."""
        engine, spool = open_storage(self.cfg)
        self.engine = engine
        self.receiver = Receiver(spool, engine, int(self.cfg.node.min_free_disk_gb * 1024**3))
        reindex_spool(self.receiver)
        with engine.begin() as conn:
            orphans = requeue_orphans(conn, socket.gethostname(), utcnow())
        if orphans:
            LOGGER.warning("taken up again after a crash: %s", ", ".join(orphans))
        _, self.server = start_scp(self.cfg, self.receiver)
        worker_id = f"{socket.gethostname()}:{os.getpid()}"
        threads: list[threading.Thread] = [Assembler(engine, self.cfg, self.stop_event)]
        if self.cfg.worker.enabled:
            from dicom_node.worker import Worker

            threads.append(Worker(self.cfg, engine, self.stop_event, f"{worker_id}:worker"))
        for destination in destinations_to_serve(self.cfg):
            threads.append(Exporter(self.cfg, engine, destination, self.stop_event, f"{worker_id}:export"))
        threads.append(StalledExportSweeper(self.cfg, engine, self.stop_event))
        for thread in threads:
            thread.start()
        self.threads.extend(threads)
        LOGGER.info("dicom-node %s started: data in %s, database %s", __version__, self.cfg.data_path,
                    self.cfg.database_url.split("://")[0])

    def stop(self) -> None:
        """Stop accepting associations, finish the current ones and stop the stages."""
        self.stop_event.set()
        if self.server is not None:
            self.server.shutdown()
        for thread in self.threads:
            thread.join(timeout=10)
        if self.engine is not None:
            self.engine.dispose()
        LOGGER.info("dicom-node stopped")


def serve(cfg: Config) -> int:
    """Run the node in the foreground until SIGINT or SIGTERM; return the exit status.

    The server runs with ``block=False`` and is shut down from this (main) thread: calling ``shutdown`` from a
    signal handler while ``start_server(block=True)`` runs deadlocks in pynetdicom.
    """
    node = Node(cfg)
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
