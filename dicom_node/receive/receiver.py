"""The receiving stage: a pynetdicom SCP for C-ECHO and C-STORE (PS3.4 Annex A and B).

The C-STORE handler stores the dataset exactly as received (no pixel decoding), fsyncs it into the spool, records
its row, and only then answers success. It never imports torch. Status codes (PS3.4 B.2.3):

==========  =====================================================================
``0x0000``  stored and recorded
``0xA700``  out of resources: disk below the watermark, write or database failure
``0xC210``  cannot understand: the dataset is structurally broken
``0xC211``  cannot understand: a required UID is missing or not a valid UID
``0xC212``  cannot understand: the dataset's SOP Instance UID differs from the request's
==========  =====================================================================

Failures carry an Error Comment (0000,0902) with the reason (one value of printable ASCII, at most 64 characters:
see :func:`dicom_node.dimse.reactor.error_comment`), and every failure is logged.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import Engine

from dicom_node.config import Config
from dicom_node.dimse.reactor import AllowListServer, ConnectionGate, EventDrivenServer, error_comment
from dicom_node.dimse.transport import quiet_peer_error_tracebacks, server_ssl_context, set_no_delay
from dicom_node.encoding import received_file_header
from dicom_node.identity import (
    IMPLEMENTATION,
    NODE_MANUFACTURER,
    application_entity,
)
from dicom_node.receive.dataset_check import MalformedDataset, check_dataset_structure, inflate
from dicom_node.store.database import utcnow
from dicom_node.store.repository import InstanceFacts, forget_instance, known_instance_paths, record_instance
from dicom_node.store.spool import Spool, is_valid_uid

LOGGER = logging.getLogger(__name__)

#: Transfer syntaxes accepted for every storage SOP class (PS3.5 Annex A, PS3.5 8.2).
ACCEPTED_TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
]

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_INVALID_UID = 0xC211
STATUS_UID_MISMATCH = 0xC212



class StoreRefused(Exception):
    """A C-STORE that must not be acknowledged; carries the DIMSE status and a reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _raw_text(ds: Dataset, tag: int) -> str:
    """The value of a text element as stored, without pydicom's conversion and validation (hot path).

    Multiple values keep their backslash separators; padding is stripped. Text that is not UTF-8 is read as
    Latin-1, which is enough for routing on descriptions and never fails.
    """
    try:
        elem = ds.get_item(tag)
    except Exception:
        return ""
    if elem is None:
        return ""
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = value.decode("latin-1")
    elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text.strip(" \x00")


def _raw_number(ds: Dataset, tag: int, kind: type) -> int | float | None:
    text = _raw_text(ds, tag).split("\\")[0].strip()
    if not text:
        return None
    try:
        return kind(float(text)) if kind is int else kind(text)
    except (TypeError, ValueError, OverflowError):
        return None


def is_node_output(ds: Dataset) -> bool:
    """Return whether ``ds`` was made by a dicom-node (its ContributingEquipmentSequence names us)."""
    if ds.get_item(0x0018A001) is None:  # (0018,A001) Contributing Equipment Sequence
        return False
    for item in ds.get("ContributingEquipmentSequence", None) or []:
        if str(item.get("Manufacturer", "")).strip() == NODE_MANUFACTURER:
            return True
    return False


def extract_facts(ds: Dataset, transfer_syntax: str, calling_ae: str, called_ae: str) -> InstanceFacts:
    """Read the UIDs and routing tags of a received dataset.

    Raises
    ------
    StoreRefused
        With 0xC211 when a required UID is missing or invalid, 0xC210 when a tag cannot be decoded.
    """
    uids = {kw: _raw_text(ds, tag) for kw, tag in (
        ("StudyInstanceUID", 0x0020000D), ("SeriesInstanceUID", 0x0020000E),
        ("SOPInstanceUID", 0x00080018), ("SOPClassUID", 0x00080016))}
    for keyword, value in uids.items():
        if not value:
            raise StoreRefused(STATUS_INVALID_UID, f"{keyword} is missing")
        if not is_valid_uid(value):
            raise StoreRefused(STATUS_INVALID_UID, f"{keyword} is not a valid UID")
    try:
        patient_name = str(ds.get("PatientName", "") or "")
        node_output = is_node_output(ds)
    except Exception as exc:  # pydicom decodes lazily; a broken value surfaces here
        raise StoreRefused(STATUS_CANNOT_UNDERSTAND, f"cannot decode attributes: {exc}") from exc
    return InstanceFacts(
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax_uid=str(transfer_syntax),
        patient_id=_raw_text(ds, 0x00100020)[:64],
        issuer_of_patient_id=_raw_text(ds, 0x00100021)[:64],
        patient_name=patient_name[:324],
        study_date=_raw_text(ds, 0x00080020)[:8],
        accession_number=_raw_text(ds, 0x00080050)[:16],
        study_description=_raw_text(ds, 0x00081030)[:64],
        modality=_raw_text(ds, 0x00080060)[:16],
        series_number=_raw_number(ds, 0x00200011, int),  # type: ignore[arg-type]
        series_description=_raw_text(ds, 0x0008103E)[:64],
        body_part=_raw_text(ds, 0x00180015)[:64],
        manufacturer=_raw_text(ds, 0x00080070)[:64],
        image_type=_raw_text(ds, 0x00080008)[:128],
        slice_thickness=_raw_number(ds, 0x00180050, float),
        instance_number=_raw_number(ds, 0x00200013, int),  # type: ignore[arg-type]
        calling_ae=calling_ae.strip()[:16],
        called_ae=called_ae.strip()[:16],
        is_node_output=node_output,
    )


@dataclass
class Receiver:
    """What the C-STORE handler needs: the spool, the database engine and the free-disk watermark."""

    spool: Spool
    engine: Engine
    min_free_bytes: int
    #: Counters for status and metrics; updated under ``lock``.
    received: int = 0
    refused: int = 0
    bytes_received: int = 0

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        #: Threads that fsync received files while the handler records their rows.
        self.sync_pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="spool-fsync")
        #: Per open association: [instances stored, instances refused].
        self.per_association: dict[int, list[int]] = {}

    def count(self, ok: bool, size: int = 0, association: int | None = None) -> None:
        with self.lock:
            if ok:
                self.received += 1
                self.bytes_received += size
            else:
                self.refused += 1
            if association is not None:
                self.per_association.setdefault(association, [0, 0])[0 if ok else 1] += 1

    def end_association(self, association: int | None) -> tuple[int, int]:
        """Forget an association's counters and return (stored, refused)."""
        if association is None:  # not started: nothing was counted
            return 0, 0
        with self.lock:
            stored, refused = self.per_association.pop(association, [0, 0])
        return stored, refused


def _failure(status: int, reason: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = error_comment(reason)  # one LO value: pydicom would split a backslash into several
    return rsp


def store_instance(receiver: Receiver, request_stream: BytesIO, transfer_syntax: str, sop_class_uid: str,
                   affected_sop_uid: str, calling_ae: str, called_ae: str) -> str:
    """Check, store and record one received dataset; return its path relative to the data directory.

    Parameters
    ----------
    receiver : Receiver
        Spool, engine and watermark.
    request_stream : BytesIO
        The encoded dataset as received (no file meta).
    transfer_syntax : str
        The presentation context's transfer syntax.
    sop_class_uid, affected_sop_uid : str
        The request's Affected SOP Class and Instance UIDs.

    Raises
    ------
    StoreRefused
        With the status to answer and the reason.
    """
    if receiver.spool.free_bytes() < receiver.min_free_bytes:
        raise StoreRefused(STATUS_OUT_OF_RESOURCES, "free disk space is below the configured watermark")
    ts = UID(transfer_syntax)
    encoded = request_stream.getbuffer()
    # The file (file meta from the request's UIDs + the bytes as received) is written and fsynced in a helper
    # thread while this one checks and parses the dataset; the fsync releases the GIL.
    meta = received_file_header(sop_class_uid, affected_sop_uid, ts, IMPLEMENTATION, calling_ae) \
        if is_valid_uid(affected_sop_uid) else None
    written = receiver.sync_pool.submit(receiver.spool.begin_write, (meta, encoded)) if meta else None
    try:
        facts = _parse_received(encoded, ts, calling_ae, called_ae)
        if facts.sop_instance_uid != affected_sop_uid:
            raise StoreRefused(STATUS_UID_MISMATCH, "SOPInstanceUID differs from the request's Affected SOP UID")
    except BaseException:
        if written is not None:
            _discard(written)
        raise
    if written is None:  # the parse refuses an invalid SOPInstanceUID, and it equals the affected one
        raise StoreRefused(STATUS_INVALID_UID, "the Affected SOP Class or Instance UID is not a valid UID")
    relative = receiver.spool.relative_path(facts.study_uid, facts.series_uid, facts.sop_instance_uid)
    target = receiver.spool.absolute(relative)
    replaced = target.exists()
    try:
        pending = written.result()
        pending.place(target)
    except OSError as exc:
        raise StoreRefused(STATUS_OUT_OF_RESOURCES, f"cannot write the file: {exc.strerror or exc}") from exc
    # The directory fsync runs beside the row's transaction; the answer waits for both.
    synced = receiver.sync_pool.submit(pending.sync_directories)
    instance_pk: int | None = None
    database_error: Exception | None = None
    try:
        with receiver.engine.begin() as conn:
            instance_pk = record_instance(conn, facts, relative, pending.size, utcnow())
    except Exception as exc:
        database_error = exc
    try:
        synced.result()
    except OSError as exc:
        LOGGER.error("cannot fsync the folder of %s: %s", relative, exc)
        if not replaced:
            _forget_unacknowledged(receiver, target, instance_pk)
        raise StoreRefused(STATUS_OUT_OF_RESOURCES, f"cannot write the file: {exc.strerror or exc}") from exc
    if database_error is not None:
        # The file is whole and fsynced, but unacknowledged: remove it so nothing unrecorded stays behind.
        # (A re-send overwrote an earlier, recorded copy: keep that one, its row still points at it.)
        LOGGER.error("database error while recording an instance: %s", database_error)
        if not replaced:
            target.unlink(missing_ok=True)
        raise StoreRefused(STATUS_OUT_OF_RESOURCES, "database error while recording the instance") from database_error
    return relative


def _parse_received(encoded: memoryview, ts: UID, calling_ae: str, called_ae: str) -> InstanceFacts:
    """Walk the received dataset's structure and read its facts; raise :class:`StoreRefused` when it is broken."""
    try:
        plain = inflate(encoded) if ts == DeflatedExplicitVRLittleEndian else encoded
        check_dataset_structure(plain, ts.is_implicit_VR, ts.is_little_endian)
        ds = read_dataset(BytesIO(plain), ts.is_implicit_VR, ts.is_little_endian)
    except MalformedDataset as exc:
        raise StoreRefused(STATUS_CANNOT_UNDERSTAND, str(exc)) from exc
    except Exception as exc:
        raise StoreRefused(STATUS_CANNOT_UNDERSTAND, f"dataset cannot be parsed: {exc}") from exc
    return extract_facts(ds, ts, calling_ae, called_ae)


def _discard(written: Any) -> None:
    """Wait for a background write that is not wanted any more and remove its file."""
    try:
        written.result().discard()
    except OSError:
        pass  # the write failed: it left nothing behind


def _forget_unacknowledged(receiver: Receiver, target: Any, instance_pk: int | None) -> None:
    """Remove the file and the row of a new instance whose write failed (best effort: both are reported)."""
    try:
        target.unlink(missing_ok=True)
        if instance_pk is not None:
            with receiver.engine.begin() as conn:
                forget_instance(conn, instance_pk)
    except Exception as exc:
        LOGGER.error("cannot remove the unacknowledged instance %s: %s", target.name, exc)


def handle_store(event: evt.Event, receiver: Receiver) -> int | Dataset:
    """EVT_C_STORE handler (PS3.4 B.2.3): store durably, then answer.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The C-STORE request event.
    receiver : Receiver
        Passed in by the server's handler binding.
    """
    assoc = event.assoc
    calling = assoc.requestor.ae_title
    called = assoc.acceptor.ae_title
    request = cast(C_STORE, event.request)  # the handler is bound to EVT_C_STORE only
    affected = str(request.AffectedSOPInstanceUID or "")
    dataset = request.DataSet
    if not isinstance(dataset, BytesIO):  # pynetdicom decodes a C-STORE request's data set into a BytesIO
        receiver.count(False, association=assoc.native_id)
        return _failure(STATUS_CANNOT_UNDERSTAND, "C-STORE request without a data set")
    try:
        relative = store_instance(receiver, dataset, event.context.transfer_syntax,
                                  str(request.AffectedSOPClassUID or ""), affected, calling, called)
    except StoreRefused as exc:
        receiver.count(False, association=assoc.native_id)
        LOGGER.warning("assoc %s from %s (%s): C-STORE refused with 0x%04X: %s",
                       assoc.native_id, calling, assoc.requestor.address, exc.status, exc.reason)
        return _failure(exc.status, exc.reason)
    except Exception as exc:  # never let a bug turn into an unanswered request
        receiver.count(False, association=assoc.native_id)
        LOGGER.exception("assoc %s: unexpected error storing an instance", assoc.native_id)
        return _failure(STATUS_OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}")
    receiver.count(True, len(dataset.getbuffer()), association=assoc.native_id)
    LOGGER.debug("assoc %s: stored %s", assoc.native_id, relative)
    return STATUS_SUCCESS


def handle_echo(event: evt.Event) -> int:
    """EVT_C_ECHO handler (PS3.4 A.4): always success."""
    return STATUS_SUCCESS


def _log_association(event: evt.Event) -> None:
    assoc = event.assoc
    LOGGER.info("assoc %s %s: calling %s at %s", assoc.native_id, event.event.name.removeprefix("EVT_").lower(),
                assoc.requestor.ae_title, assoc.requestor.address)


def _log_association_end(event: evt.Event, receiver: Receiver) -> None:
    assoc = event.assoc
    stored, refused = receiver.end_association(assoc.native_id)
    LOGGER.info("assoc %s %s: calling %s at %s; %d instance(s) stored, %d refused", assoc.native_id,
                event.event.name.removeprefix("EVT_").lower(), assoc.requestor.ae_title, assoc.requestor.address,
                stored, refused)


def rejection_reason(assoc: Any, cfg: Config) -> str:
    """Why ``assoc`` was rejected, in the terms of the setting an administrator would change.

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        A rejected acceptor association: read are the A-ASSOCIATE-RJ the node sent (result, source and
        diagnostic, PS3.8 9.3.4) and the request's AE titles.
    cfg : Config
        The running configuration, whose keys the reason names.

    Returns
    -------
    str
        For example ``called AE title 'WRONGAE' is not node.ae_title 'DENOISE' (permanent)``.
    """
    request = assoc.requestor.primitive
    reject = assoc.acceptor.primitive
    called = str(getattr(request, "called_ae_title", "") or "").strip()
    calling = str(getattr(request, "calling_ae_title", "") or "").strip()
    result = getattr(reject, "result", None)
    kind = "permanent" if result == 1 else "transient" if result == 2 else ""
    code = (getattr(reject, "result_source", None), getattr(reject, "diagnostic", None))
    if code == (1, 7):
        why = f"called AE title {called!r} is not node.ae_title {cfg.node.ae_title!r}"
    elif code == (1, 3):
        why = f"calling AE title {calling!r} is not in security.allowed_calling_ae_titles"
    elif code == (3, 2):
        why = f"node.max_associations ({cfg.node.max_associations}) associations are open"
    elif code == (2, 1):
        why = "the user identity was not accepted"
    else:
        why = str(getattr(reject, "reason_str", "") or "no reason given").lower()
    return f"{why} ({kind})" if kind else why


def _log_rejected(event: evt.Event, cfg: Config) -> None:
    """One WARNING line per rejected association: the titles the peer sent, its address and the reason."""
    assoc = event.assoc
    request = assoc.requestor.primitive
    called = str(getattr(request, "called_ae_title", "") or "").strip()
    calling = str(getattr(request, "calling_ae_title", "") or "").strip()
    LOGGER.warning("association rejected: calling %r, called %r, from %s:%s: %s", calling, called,
                   assoc.requestor.address, assoc.requestor.port, rejection_reason(assoc, cfg))


def build_ae(cfg: Config) -> AE:
    """Build the SCP application entity: every storage SOP class with every accepted transfer syntax."""
    ae = application_entity(cfg.node.ae_title)
    ae.maximum_associations = cfg.node.max_associations
    ae.maximum_pdu_size = cfg.node.max_pdu_size
    ae.network_timeout = cfg.node.network_timeout
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.require_called_aet = True
    ae.require_calling_aet = list(cfg.security.allowed_calling_ae_titles)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


def start_scp(cfg: Config, receiver: Receiver) -> tuple[AE, Any]:
    """Start the SCP in background threads; return the AE and its server (call ``server.shutdown()``)."""
    ae = build_ae(cfg)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [receiver]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_ACCEPTED, _log_association),
        (evt.EVT_RELEASED, _log_association_end, [receiver]),
        (evt.EVT_ABORTED, _log_association_end, [receiver]),
        (evt.EVT_REJECTED, _log_rejected, [cfg]),
        (evt.EVT_CONN_OPEN, lambda event: set_no_delay(event.assoc)),
    ]
    # Hosts outside the allow-list, and a host's connections beyond its cap, are closed at accept; the others
    # get node.association_request_timeout for their request (see ConnectionGate).
    gate = ConnectionGate([ipaddress.ip_network(h, strict=False) for h in cfg.security.allowed_hosts],
                          cfg.security.max_pending_per_host, cfg.node.association_request_timeout)
    quiet_peer_error_tracebacks()
    ssl_context = server_ssl_context(cfg) if cfg.security.tls else None
    # ae.start_server(block=False), with pynetdicom's polling reactors replaced by event-driven ones on the fast
    # path; on the stock path pynetdicom's own server, with the allow-list checked at accept.
    server_class = EventDrivenServer if cfg.node.dimse_fast_path else AllowListServer
    server = ae.make_server((cfg.node.bind_address, cfg.node.port), evt_handlers=handlers,
                            ssl_context=ssl_context, server_class=server_class, gate=gate)
    thread = threading.Thread(target=server.serve_forever, name="dicom-scp", daemon=True)
    thread.start()
    ae._servers.append(server)  # so ae.shutdown() stops it, as for start_server
    LOGGER.info("listening as %s on %s:%d%s%s", cfg.node.ae_title, cfg.node.bind_address, cfg.node.port,
                " (TLS)" if ssl_context else "", "" if cfg.node.dimse_fast_path else " (stock pynetdicom)")
    return ae, server


def reindex_spool(receiver: Receiver) -> int:
    """Record every spool file that has no row (after a power loss cut the last commits); return how many.

    Also removes partial files of writes that a crash interrupted (they were never acknowledged). Files are
    renamed into place only after their fsync, so a file in place is whole as written; each one without a row
    is still walked like a received dataset (a failing disk or a restore can damage it) and, when broken, moved
    to ``<data_dir>/quarantine/`` instead of being recorded.
    """
    receiver.spool.remove_incoming_leftovers()
    with receiver.engine.connect() as conn:
        known = known_instance_paths(conn)
    added = 0
    for path in receiver.spool.iter_files():
        relative = path.relative_to(receiver.spool.root.parent).as_posix()
        if relative in known:
            continue
        try:
            facts, size = _facts_of_spool_file(path)
        except (MalformedDataset, StoreRefused, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            quarantined = _quarantine(receiver, path)
            LOGGER.error("spool file %s has no row and is broken (%s): moved to %s", relative, reason, quarantined)
            continue
        try:
            with receiver.engine.begin() as conn:
                record_instance(conn, facts, relative, size, utcnow())
            added += 1
        except Exception as exc:
            LOGGER.error("cannot re-index spool file %s: %s", relative, exc)
    if added:
        LOGGER.warning("re-indexed %d spool file(s) that had no database row", added)
    return added


def _facts_of_spool_file(path: Any) -> tuple[InstanceFacts, int]:
    """Check a spool file like a received dataset and return its facts and size."""
    data = path.read_bytes()
    stream = BytesIO(data)
    read_preamble(stream, False)
    file_meta = _read_file_meta_info(stream)
    ts = UID(str(file_meta.get("TransferSyntaxUID", "")))
    if not ts.is_transfer_syntax:
        raise ValueError("no valid transfer syntax in the file meta")
    encoded = memoryview(data)[stream.tell():]
    plain = inflate(encoded) if ts == DeflatedExplicitVRLittleEndian else encoded
    check_dataset_structure(plain, ts.is_implicit_VR, ts.is_little_endian)
    ds = read_dataset(BytesIO(plain), ts.is_implicit_VR, ts.is_little_endian)
    facts = extract_facts(ds, ts, str(file_meta.get("SourceApplicationEntityTitle", "")), "")
    return facts, len(data)


def _quarantine(receiver: Receiver, path: Any) -> str:
    """Move a broken spool file out of the spool, keeping it for inspection; return where it went."""
    folder = receiver.spool.root.parent / "quarantine"
    folder.mkdir(parents=True, exist_ok=True)
    destination = folder / f"{path.parent.name}-{path.name}"
    path.replace(destination)
    return str(destination)
