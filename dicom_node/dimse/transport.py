"""The DIMSE transport around pynetdicom's associations: TCP and TLS settings, why an association failed, C-ECHO.

Used by both directions: the SCP (:mod:`dicom_node.receive.receiver`) and the SCU (:mod:`dicom_node.export`).
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.config import Config, Destination
from dicom_node.identity import application_entity

LOGGER = logging.getLogger(__name__)


def set_no_delay(assoc: Any) -> None:
    """Turn off Nagle's algorithm on an association's socket (pynetdicom leaves it on).

    With Nagle on, a write made while the previous one is unacknowledged waits for the peer's delayed ACK. A series
    sent to a PACS goes out as many PDUs of the destination's maximum length (16 KiB for Orthanc and dcmtk by
    default), each its own ``send``: measured on loopback, pynetdicom sent 26 instances/s to Orthanc with Nagle
    on and about 60/s with it off.
    """
    try:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:
        LOGGER.debug("cannot set TCP_NODELAY: %s", exc)


class _NoTracebackForPeerErrors(logging.Filter):
    """Drop the traceback pynetdicom's DUL logs (at ERROR, ``LOGGER.exception``) when a peer's connection breaks
    or times out mid-PDU: a peer can cause it at will, and the one-line message before it says what happened."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], OSError):
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def quiet_peer_error_tracebacks() -> None:
    """Log a peer's broken or timed-out connection as one WARNING line, without pynetdicom's traceback
    (idempotent)."""
    dul_logger = logging.getLogger("pynetdicom.dul")
    if not any(isinstance(f, _NoTracebackForPeerErrors) for f in dul_logger.filters):
        dul_logger.addFilter(_NoTracebackForPeerErrors())


def server_ssl_context(cfg: Config) -> ssl.SSLContext:
    """Server TLS context from ``[security]`` (PS3.15 B.1, TLS 1.2 or newer)."""
    sec = cfg.security
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(sec.certificate, sec.private_key)
    if sec.trusted_cas:
        context.load_verify_locations(cafile=sec.trusted_cas)
    context.verify_mode = ssl.CERT_REQUIRED if sec.require_client_certificate else (
        ssl.CERT_OPTIONAL if sec.trusted_cas else ssl.CERT_NONE)
    return context


def client_ssl_context(cfg: Config) -> ssl.SSLContext:
    """Client TLS context for destinations with ``tls = true`` (our certificate when configured)."""
    sec = cfg.security
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=sec.trusted_cas or None)
    if sec.certificate and sec.private_key:
        context.load_cert_chain(sec.certificate, sec.private_key)
    return context


def association_failure(assoc: Any, dest: Destination) -> str:
    """Why an association with ``dest`` was not established, in words an administrator can act on."""
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    if assoc.is_rejected:
        rsp = getattr(assoc.acceptor, "primitive", None)
        reason = getattr(rsp, "reason_str", "") if rsp is not None else ""
        return f"association with {where} rejected{f' ({reason})' if reason else ''}"
    try:
        with socket.create_connection((dest.host, dest.port), timeout=min(5.0, dest.timeout_seconds)):
            pass
    except OSError as exc:
        return f"association with {where} failed: cannot connect ({exc.strerror or exc})"
    return f"association with {where} failed: the peer aborted or did not answer"


def c_echo(cfg: Config, dest: Destination) -> tuple[bool, str]:
    """C-ECHO the DIMSE destination ``dest`` (PS3.4 A.4); return whether it answered success and a one-line
    description."""
    ae = application_entity(dest.calling_ae_title or cfg.node.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_seconds
    tls_args = (client_ssl_context(cfg), dest.host) if dest.tls else None
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        return False, f"{dest.name}: {association_failure(assoc, dest)}"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code == 0x0000:
        return True, f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}): C-ECHO success"
    shown = f"0x{code:04X}" if code is not None else "no response"
    return False, f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}): C-ECHO failed ({shown})"
