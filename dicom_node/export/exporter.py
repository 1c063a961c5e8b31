"""The export stage: send queued series to their destinations by C-STORE (PS3.4 Annex B, SCU role).

One exporter thread per destination, so a destination that is down or slow never holds up another. Each
attempt opens up to the destination's ``associations`` (two by default) for the series; they share its
instances, so the destination can store two at once (Orthanc took 1.85-2.03 s instead of 2.68-3.43 s for 300
CT slices over two associations, on a 2-core machine). Each association proposes a presentation context per SOP class
with the files' own transfer syntax plus the uncompressed ones, and a file is transcoded when the destination
accepted only an uncompressed syntax for it. Every instance's status is recorded; instances already accepted are
not sent again on the next attempt, nor by a later export of the same series to the same destination (a series
that grew). Failed attempts are retried with capped exponential backoff and jitter, then the export is
``failed`` (visible in ``dicom-node jobs list``) until an operator retries it.

The pseudo-destination ``local`` copies the files to ``<data_dir>/output/<study>/<series>/`` instead.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config, build_context
from sqlalchemy import Engine

from dicom_node.config import LOCAL_DESTINATION, Config, Destination
from dicom_node.dicomweb.stow_send import echo_dicomweb, send_series_stow
from dicom_node.dimse.transport import association_failure, c_echo, client_ssl_context, set_no_delay
from dicom_node.identity import application_entity
from dicom_node.ops import metrics
from dicom_node.store import audit
from dicom_node.store.database import utcnow
from dicom_node.store.doorbell import Doorbell
from dicom_node.store.periodic import PeriodicTask
from dicom_node.store.queue import (
    ClaimedExport,
    RetryPolicy,
    claim_export,
    finish_export,
    heartbeat_export,
    pending_export_instances,
    record_instance_status,
    requeue_stalled_exports,
)

LOGGER = logging.getLogger(__name__)

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
#: Destination answers are written to the database at least every this many instances or seconds.
STATUS_BATCH = 32
STATUS_BATCH_SECONDS = 1.0


def _headers(paths: list[tuple[int, str, Path]]) -> list[tuple[int, str, Path, str, str]]:
    """Each file's SOP class and transfer syntax, from its File Meta Information only (group 0002: the rest of
    the header is not needed to choose presentation contexts, and reading it took 0.2 s for 300 CT slices
    before the association could open)."""
    out = []
    for key, sop, path in paths:
        meta = read_file_meta_info(path)
        out.append((key, sop, path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    return out


def _configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings for sending (idempotent).

    - Files are sent as stored: ``send_c_store(path)`` streams the dataset's bytes after the file meta instead of
      decoding and re-encoding every element (transcoding passes a decoded dataset and is not affected). This is
      a pynetdicom option, used on both paths.

    Which association class ``AE.associate`` builds is decided once, by ``Node.start`` (``node.dimse_fast_path``,
    see :func:`dicom_node.dimse.reactor.use_event_driven_requestors`), never here.
    """
    _config.STORE_SEND_CHUNKED_DATASET = True


#: A series gets one association per this many instances, up to the destination's ``associations``: opening
#: a second association is not worth it for a short series.
INSTANCES_PER_EXTRA_ASSOCIATION = 16

_Header = tuple[int, str, Path, str, str]


def send_series(cfg: Config, dest: Destination, files: list[tuple[int, str, Path]],
                on_status: Any) -> str:
    """Send ``files`` (key, SOP UID, path) to ``dest``; call ``on_status(key, status, error)`` for each.

    Up to ``dest.associations`` associations run at once (fewer for a short series). They share one work list:
    each takes the next instance when its last one was answered, so a slow association does not hold back the
    series, and when the destination refuses the extra associations (a per-AE limit) the ones it accepted send
    everything. With one association the instances go in slice order, as from a scanner.

    Returns an error text for the attempt when instances were left unsent (no association, or every
    association ended early), else ""; per-instance failures are reported through ``on_status`` only.
    ``on_status`` is called from one thread at a time.
    """
    _configure_pynetdicom()
    headers = _headers(files)
    wanted: dict[str, list[str]] = {}
    for _key, _sop, _path, sop_class, ts in headers:
        syntaxes = wanted.setdefault(sop_class, [])
        for syntax in [ts, *UNCOMPRESSED]:
            if syntax not in syntaxes:
                syntaxes.append(syntax)
    contexts = [build_context(sop_class, syntaxes) for sop_class, syntaxes in wanted.items()]
    if len(contexts) > 128:
        return f"series needs {len(contexts)} presentation contexts; at most 128 fit one association"
    work: deque[_Header] = deque(headers)
    status_lock = threading.Lock()

    def report(key: int, status: int | None, error: str) -> None:
        with status_lock:
            on_status(key, status, error)

    count = max(1, min(dest.associations, -(-len(headers) // INSTANCES_PER_EXTRA_ASSOCIATION)))
    outcomes: list[tuple[bool, str]] = [(False, "not run")] * count

    name = threading.current_thread().name
    started: list[threading.Thread] = []

    def open_the_others() -> None:
        # Only once the first association is up: a destination that counts associations per AE may refuse
        # requests that arrive together, and one accepted association is enough to send the series.
        for index in range(1, count):
            started.append(threading.Thread(target=lane, args=(index,), name=f"{name}-{index + 1}", daemon=True))
            started[-1].start()

    def lane(index: int, on_open: Any = None) -> None:
        try:
            outcomes[index] = _send_over_one_association(cfg, dest, contexts, work, report, on_open)
        except Exception as exc:  # noqa: BLE001 - reported as this association's outcome
            LOGGER.exception("export to %s: association %d failed", dest.name, index + 1)
            outcomes[index] = (True, f"{type(exc).__name__}: {exc}")

    lane(0, open_the_others if count > 1 else None)
    for thread in started:
        thread.join()
    opened = [error for was_opened, error in outcomes if was_opened]
    refused = [error for was_opened, error in outcomes if not was_opened]
    if not opened:
        return refused[0]
    if refused:
        LOGGER.info("%s accepted %d of %d associations (%s); those sent the series", dest.name, len(opened),
                    count, refused[0])
    if not work:
        return ""
    return "; ".join(dict.fromkeys(e for e in opened if e)) or "association ended early"


def _send_over_one_association(cfg: Config, dest: Destination, contexts: list[Any], work: deque[_Header],
                               report: Any, on_open: Any = None) -> tuple[bool, str]:
    """Open one association and send instances from ``work`` over it until ``work`` is empty.

    ``on_open()`` is called once the association is established. Returns whether it was established, and an
    error text ("" when it ran to its end).
    """
    ae = application_entity(dest.calling_ae_title or cfg.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_seconds
    ae.maximum_pdu_size = 0
    tls_args = (client_ssl_context(cfg), dest.host) if dest.tls else None
    assoc = ae.associate(dest.host, dest.port, contexts=contexts, ae_title=dest.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        return False, association_failure(assoc, dest)
    set_no_delay(assoc)
    try:
        if on_open is not None:
            on_open()
        accepted: dict[str, set[str]] = {}
        for cx in assoc.accepted_contexts:
            accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
        while True:
            if not assoc.is_established:
                return True, "association ended early"
            try:
                key, _sop, path, sop_class, ts = work.popleft()
            except IndexError:
                return True, ""
            offered = accepted.get(sop_class, set())
            if not offered:
                report(key, None, f"destination accepts no context for SOP class {sop_class}")
                continue
            try:
                if ts in offered:
                    status = assoc.send_c_store(path)
                else:
                    status = assoc.send_c_store(_transcoded(path, offered))
            except Exception as exc:  # a broken association or an undecodable file
                report(key, None, f"{type(exc).__name__}: {exc}")
                continue
            code = getattr(status, "Status", None)
            comment = str(getattr(status, "ErrorComment", "") or "")
            report(key, code, "" if code == 0 else (comment or ("no response" if code is None else "")))
    finally:
        if assoc.is_established:
            assoc.release()


def _transcoded(path: Path, offered: set[str]) -> Any:
    """The file's dataset decoded to an uncompressed syntax the destination accepted."""
    ds = dcmread(path)
    target = ExplicitVRLittleEndian if ExplicitVRLittleEndian in offered else ImplicitVRLittleEndian
    if UID(ds.file_meta.TransferSyntaxUID).is_compressed:
        ds.decompress()
    for _ in ds.iterall():  # decode every raw element, so it can be written in the new encoding
        pass
    ds.file_meta.TransferSyntaxUID = target
    ds.set_original_encoding(target.is_implicit_VR, True, ds.original_character_set)
    return ds


def send_to_destination(cfg: Config, dest: Destination, files: list[tuple[int, str, Path]], on_status: Any) -> str:
    """Send ``files`` to ``dest`` by its type: C-STORE (:func:`send_series`) or STOW-RS
    (:func:`dicom_node.dicomweb.stow_send.send_series_stow`); both report through ``on_status(key, status, error)``
    and return the attempt's error text ("" when every instance was answered)."""
    if dest.type == "dicomweb":
        return send_series_stow(cfg, dest, files, on_status)
    return send_series(cfg, dest, files, on_status)


def echo_destination(cfg: Config, dest: Destination) -> tuple[bool, str]:
    """C-ECHO ``dest`` (PS3.4 A.4), or for a ``dicomweb`` destination a QIDO-RS ``GET {url}/studies?limit=1``;
    return whether it answered success and a one-line description."""
    if dest.type == "dicomweb":
        return echo_dicomweb(dest)
    return c_echo(cfg, dest)


def copy_to_local(cfg: Config, files: list[tuple[int, str, Path]], on_status: Any) -> str:
    """The ``local`` destination: copy files to ``output/<study>/<series>/`` durably."""
    for key, sop, path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
            folder = cfg.output_path / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
            folder.mkdir(parents=True, exist_ok=True)
            temp = folder / f".{sop}.part"
            shutil.copyfile(path, temp)
            with open(temp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(temp, folder / f"{sop}.dcm")
            on_status(key, 0x0000, "")
        except OSError as exc:
            on_status(key, None, f"cannot copy: {exc}")
    return ""


def run_export(cfg: Config, engine: Engine, claimed: ClaimedExport, policy: RetryPolicy) -> str:
    """Run one attempt of a claimed export and close it; return the resulting state's name."""
    started = time.monotonic()
    with engine.connect() as conn:
        pending = pending_export_instances(conn, claimed.id)
    files = [(key, sop, cfg.data_path / rel) for key, sop, rel in pending]

    # Answers are recorded in small batches: one transaction per instance cost about as much as sending it. If
    # the node dies before a batch is written, those instances are sent again on the retry; their SOP Instance
    # UIDs are the same, so the destination still holds each once.
    unrecorded: list[tuple[int, int | None, str, dt.datetime]] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        if unrecorded:
            with engine.begin() as conn:
                for key, status, error, when in unrecorded:
                    record_instance_status(conn, key, status, error, when)
                heartbeat_export(conn, claimed.id, utcnow())
            unrecorded.clear()
        last_flush = time.monotonic()

    def on_status(key: int, status: int | None, error: str) -> None:
        unrecorded.append((key, status, error, utcnow()))
        if len(unrecorded) >= STATUS_BATCH or time.monotonic() - last_flush >= STATUS_BATCH_SECONDS:
            flush()

    error = ""
    if files:
        if claimed.destination == LOCAL_DESTINATION:
            error = copy_to_local(cfg, files, on_status)
        else:
            try:
                dest = cfg.destination(claimed.destination)
            except KeyError as exc:
                error = f"destination removed from the configuration: {exc.args[0]}"
            else:
                try:
                    error = send_to_destination(cfg, dest, files, on_status)
                except Exception as exc:
                    LOGGER.exception("export %d: unexpected error", claimed.id)
                    error = f"{type(exc).__name__}: {exc}"
        flush()
    give_up = policy.gives_up(claimed.attempts)
    retry_at = None if give_up else utcnow() + dt.timedelta(seconds=policy.delay(claimed.attempts))
    with engine.begin() as conn:
        state = finish_export(conn, claimed.id, utcnow(), error, retry_at, give_up)
        if state.value in ("succeeded", "failed"):
            audit.record(conn, "series.exported" if state.value == "succeeded" else "export.failed",
                         "node:export", utcnow(), object_kind="export", object_id=claimed.id,
                         series_uid=claimed.series_uid,
                         detail=f"to {claimed.destination}, attempt {claimed.attempts}"
                         + (f": {error}" if error else ""))
    metrics.record_export(claimed.destination, state.value, time.monotonic() - started)
    level = logging.INFO if state.value == "succeeded" else logging.WARNING
    LOGGER.log(level, "export %d of series %s to %s, attempt %d: %s%s", claimed.id, claimed.series_uid,
               claimed.destination, claimed.attempts, state.value, f" ({error})" if error else "")
    return state.value


class Exporter(threading.Thread):
    """Sends the exports of one destination until ``stop`` is set."""

    def __init__(self, cfg: Config, engine: Engine, destination: str, stop: threading.Event,
                 worker_id: str, bell: Doorbell | None = None) -> None:
        super().__init__(name=f"export-{destination}", daemon=True)
        self.bell = bell or Doorbell()  # rung when exports are queued in this process
        self.cfg = cfg
        self.engine = engine
        self.destination = destination
        self.stop_event = stop
        self.worker_id = worker_id
        self.policy = RetryPolicy(cfg.export.max_attempts, cfg.export.backoff_base_seconds,
                                  cfg.export.backoff_max_seconds)

    def run_once(self) -> bool:
        with self.engine.begin() as conn:
            claimed = claim_export(conn, self.destination, self.worker_id, utcnow())
        if claimed is None:
            return False
        run_export(self.cfg, self.engine, claimed, self.policy)
        return True

    def run(self) -> None:
        while not self.stop_event.is_set():
            seen = self.bell.rings
            try:
                ran = self.run_once()
            except Exception:
                LOGGER.exception("exporter %s loop error; retrying", self.destination)
                ran = False
            if not ran:
                self.bell.wait(seen, self.cfg.export.poll_seconds)


class StalledExportSweeper(PeriodicTask):
    """Requeues exports whose exporter died (another process, or a crash) every ``poll`` seconds."""

    def __init__(self, cfg: Config, engine: Engine, stop: threading.Event, poll: float = 30.0) -> None:
        super().__init__("export-sweeper", self.sweep_once, stop, poll)
        self.cfg, self.engine = cfg, engine

    def sweep_once(self) -> list[int]:
        with self.engine.begin() as conn:
            ids = requeue_stalled_exports(conn, utcnow(), self.cfg.export.stall_timeout_seconds)
        if ids:
            LOGGER.warning("exports %s made no progress; queued again", ids)
        return ids


def destinations_to_serve(cfg: Config) -> list[str]:
    """Every configured destination plus ``local``."""
    return [d.name for d in cfg.destinations] + [LOCAL_DESTINATION]
