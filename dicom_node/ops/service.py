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

import errno
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import evt
from sqlalchemy import Engine

from dicom_node import __version__
from dicom_node.assemble.assembler import Assembler
from dicom_node.config import Config, ConfigError
from dicom_node.denoise.cpu_memory import keep_freed_memory
from dicom_node.denoise.worker import ModelCache, Worker
from dicom_node.dimse.reactor import use_event_driven_requestors
from dicom_node.export.exporter import Exporter, StalledExportSweeper, destinations_to_serve
from dicom_node.ops import metrics
from dicom_node.ops.probe import web_url
from dicom_node.ops.reload import reload_node
from dicom_node.receive.receiver import Receiver, reindex_spool, start_scp
from dicom_node.store import audit
from dicom_node.store.database import make_engine, migrate, utcnow
from dicom_node.store.doorbell import Doorbell
from dicom_node.store.lease import LeaseKeeper, start_lease, stop_lease
from dicom_node.store.queue import ProcessIdentity
from dicom_node.store.retention import RetentionSweeper
from dicom_node.store.spool import Spool
from dicom_node.web.server import start_web

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
    #: This process start's identity: its claims on jobs and exports are valid while its lease is.
    identity: ProcessIdentity = field(default_factory=ProcessIdentity.new)

    def start(self) -> None:
        """Open storage, re-index the spool, take up orphaned work, start the stages of this process's roles.

        Raises
        ------
        ListenError
            When the DICOM port or (role ``web``) the web port cannot be opened; checked first, before anything
            else is touched, and again where each server binds.
        """
        check_listen_ports(self.cfg, self.roles)
        if self.cfg.node.dimse_fast_path:
            # Before any stage runs, so every association this process opens is of one kind (see dimse.reactor).
            use_event_driven_requestors()
        runs_models = "worker" in self.roles and self.cfg.worker.enabled
        if runs_models and self.cfg.models.keep_freed_cpu_memory:
            keep_freed_memory()  # before any thread starts: a thread keeps the malloc arena it first used
        engine, spool = open_storage(self.cfg)
        self.engine = engine
        receiver: Receiver | None = None  # role "receive" only
        if "receive" in self.roles:
            receiver = self.receiver = Receiver(spool, engine, int(self.cfg.node.min_free_disk_gb * 1024**3))
            reindex_spool(receiver)
        roles_text = ",".join(r for r in ROLES if r in self.roles)
        orphans = start_lease(engine, self.identity, roles_text, self.cfg.worker.lease_seconds)
        if orphans:
            LOGGER.warning("taken up again after a crash: %s", ", ".join(orphans))
        threads: list[threading.Thread] = [
            LeaseKeeper(engine, self.identity, roles_text, self.cfg.worker.lease_seconds, self.stop_event,
                        bells=(self.jobs_bell, self.exports_bell))]
        if "receive" in self.roles:
            threads.append(Assembler(engine, self.cfg, self.stop_event, jobs_bell=self.jobs_bell,
                                     exports_bell=self.exports_bell))
            threads.append(audit.AuditPurger(self.cfg, engine, self.stop_event))
            threads.append(RetentionSweeper(self.cfg, engine, self.stop_event))
        if runs_models:
            self.models = ModelCache(self.cfg)
            threads.append(Worker(self.cfg, engine, self.stop_event, self.identity.worker_id("worker"),
                                  models=self.models,
                                  jobs_bell=self.jobs_bell, exports_bell=self.exports_bell))
        if "export" in self.roles:
            for destination in destinations_to_serve(self.cfg):
                threads.append(Exporter(self.cfg, engine, destination, self.stop_event,
                                        self.identity.worker_id("export"),
                                        bell=self.exports_bell))
            threads.append(StalledExportSweeper(self.cfg, engine, self.stop_event))
        for thread in threads:
            thread.start()
        self.threads.extend(threads)
        if receiver is not None:
            try:
                _, self.server = start_scp(self.cfg, receiver)
            except OSError as exc:
                if (error := listen_error("node.port", self.cfg.node.bind_address, self.cfg.node.port, exc)):
                    raise error from exc
                raise
            _count_associations(self.server)
        if self.cfg.web.port:
            try:
                self.web = start_web(self)
            except OSError as exc:
                if "web" in self.roles:
                    if (error := listen_error("web.port", self.cfg.web.bind_address, self.cfg.web.port, exc)):
                        raise error from exc
                    raise
                LOGGER.warning("cannot serve /metrics on %s:%d (%s); set web.port per process or 0",
                               self.cfg.web.bind_address, self.cfg.web.port, exc.strerror or exc)
        # Recorded only once everything runs: a start that failed (a port in use...) never ran this configuration.
        with engine.begin() as conn:
            audit.record_config(conn, self.cfg, utcnow())
        LOGGER.info("dicom-node %s started (roles %s): data in %s, database %s", __version__,
                    ",".join(r for r in ROLES if r in self.roles), self.cfg.data_path,
                    self.cfg.database_url.split("://")[0])
        if self.web is not None and "web" in self.roles:
            log_dashboard(self.cfg)

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
            stop_lease(self.engine, self.identity)
            self.engine.dispose()
        LOGGER.info("dicom-node stopped")


def log_dashboard(cfg: Config) -> None:
    """Log where the dashboard is and whether anyone can log in (a WARNING naming the command when nobody can)."""
    url = web_url(cfg, "/")
    if cfg.web.bind_address.strip() in ("", "0.0.0.0", "::", "*"):
        url += " (and on every other address of this host)"
    if cfg.web.users:
        LOGGER.info("dashboard at %s: %d user(s) can log in", url, len(cfg.web.users))
    else:
        config = cfg.source if cfg.source != "defaults" else "FILE"
        LOGGER.warning("dashboard at %s, but no user can log in ([web] users is empty): add one with "
                       "`dicom-node web add-user NAME --role admin --config %s`, then reload (SIGHUP) or restart "
                       "the node", url, config)


#: Exit status of ``serve`` when the configuration cannot work on this host (a port in use), as for an invalid
#: file (``dicom-node config check``, and every command): the unit file keeps systemd from restarting on it.
EXIT_CONFIGURATION = 2

#: errno values of ``bind`` that an administrator fixes in the configuration (anything else is raised as it is).
_LISTEN_ERRNOS = frozenset({errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL})


class ListenError(Exception):
    """A port of this process cannot be opened; the message is one line naming the key, address and port."""


def listen_error(key: str, address: str, port: int, exc: OSError) -> ListenError | None:
    """The :class:`ListenError` for ``exc``, raised binding ``key`` (``node.port`` or ``web.port``), or ``None``
    when ``exc`` is not about the address or port."""
    if exc.errno not in _LISTEN_ERRNOS:
        return None
    section = key.split(".")[0]
    if exc.errno == errno.EADDRINUSE:
        text = f"{key} {port} is already in use on {address} (errno {exc.errno})"
    elif exc.errno == errno.EACCES:
        text = (f"{key} {port} on {address}: permission denied (errno {exc.errno}); ports below 1024 need "
                f"CAP_NET_BIND_SERVICE")
    else:
        text = f"{section}.bind_address {address!r} is not an address of this host (errno {exc.errno})"
    return ListenError(text)


def _listen_ports(cfg: Config, roles: frozenset[str]) -> list[tuple[str, str, int]]:
    """``(key, address, port)`` of each port this process must be able to open."""
    ports = []
    if "receive" in roles:
        ports.append(("node.port", cfg.node.bind_address, cfg.node.port))
    if "web" in roles and cfg.web.port:  # other roles only warn when they cannot serve /metrics
        ports.append(("web.port", cfg.web.bind_address, cfg.web.port))
    return ports


def check_listen_ports(cfg: Config, roles: frozenset[str]) -> None:
    """Bind and listen on each port this process will serve, then let it go again.

    Done before storage is opened or a stage started, so a port in use ends the start with one line and no
    side effect. ``SO_REUSEADDR`` as the servers set it, so a port with connections in TIME_WAIT is free.

    Raises
    ------
    ListenError
        For the first port that cannot be opened.
    """
    for key, address, port in _listen_ports(cfg, roles):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
                probe.listen(1)
            except OSError as exc:
                if (error := listen_error(key, address, port, exc)):
                    raise error from exc
                # anything else (an unresolvable name...) is left to the server itself to report


def _count_associations(server: Any) -> None:
    """Count associations, and connections closed before associating, for ``/metrics`` (bound to the running
    server; the receive module stays untouched)."""
    server.gate.on_close = metrics.count_closed_connection

    for event, outcome in ((evt.EVT_ACCEPTED, "accepted"), (evt.EVT_REJECTED, "rejected"),
                           (evt.EVT_ABORTED, "aborted"), (evt.EVT_RELEASED, "released")):
        server.bind(event, lambda _event, outcome=outcome: metrics.count_association(outcome))


def serve(cfg: Config, roles: frozenset[str] = frozenset(ROLES)) -> int:
    """Run the node in the foreground until SIGINT or SIGTERM; return the exit status.

    The server runs with ``block=False`` and is shut down from this (main) thread: calling ``shutdown`` from a
    signal handler while ``start_server(block=True)`` runs deadlocks in pynetdicom.
    """
    node = Node(cfg, roles)
    reload_requested = threading.Event()
    # SIGHUP reloads the configuration file (dicom_node.ops.reload); installed first, since by default it would end
    # the process. The reload runs in this thread, never inside the handler.
    signal.signal(signal.SIGHUP, lambda _signum, _frame: reload_requested.set())
    try:
        node.start()
    except ListenError as exc:
        if node.engine is not None:
            node.stop()  # stages that already started
        print(f"dicom-node: {exc}", file=sys.stderr)
        return EXIT_CONFIGURATION

    def _on_signal(signum: int, _frame: Any) -> None:
        LOGGER.info("received %s, shutting down", signal.Signals(signum).name)
        node.stop_event.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        while not node.stop_event.wait(0.5):
            if reload_requested.is_set():
                reload_requested.clear()
                _reload_on_signal(node)
    finally:
        node.stop()
    return 0


def _reload_on_signal(node: Node) -> None:
    """Reload after SIGHUP; an invalid file is logged with every problem and the running configuration kept."""
    LOGGER.info("received SIGHUP, reloading %s", node.cfg.source)
    try:
        reload_node(node, "signal:SIGHUP")
    except ConfigError as exc:
        LOGGER.error("configuration not reloaded, the running one is kept: %s", exc)
    except Exception:  # a reload must never end the node
        LOGGER.exception("configuration reload failed; the running one is kept")
