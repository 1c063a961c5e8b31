"""STOW-RS receive (PS3.18 10.5, origin server): ``POST /dicomweb/studies[/{study}]`` on the web port.

Served by processes with the ``receive`` role when ``[dicomweb] enabled = true``. Each instance goes through the
C-STORE handler's own durable path, :func:`dicom_node.receive.receiver.store_instance` (structure check, write, fsync,
rename, row committed), with the SOP Class, SOP Instance and Transfer Syntax UIDs of the part's File Meta
Information in the place of the C-STORE request's; the calling AE title recorded is the source's ``ae_title``
(default: its name, cut to 16 characters).

Order of checks, each answered before any byte of the body is read:

====  ==============================================================================================
429   the client's address, or the basic user name it claims, is locked by the login throttle
      (:mod:`dicom_node.store.throttle`, the dashboard's limits; the name counted as ``dicomweb:NAME``)
401   no or wrong credentials (bearer token or HTTP basic of a ``[dicomweb] sources`` entry); audited as
      ``login.failed``, logged and counted by the login throttle, like a failed dashboard login
415   the Content-Type is not ``multipart/related; type="application/dicom"``
411   no Content-Length (chunked request bodies are not accepted)
413   the body is larger than ``dicomweb.max_request_gb``
507   storing the body would take free disk below ``node.min_free_disk_gb`` (the C-STORE watermark)
406   the Accept header asks for neither DICOM JSON nor XML
====  ==============================================================================================

Then the body is split as it streams in (:mod:`dicom_node.dicomweb.multipart`), each part into a temporary file
in ``spool/.incoming`` (removed at start-up after a crash, like every partial write). **Nothing is stored until
the whole body, up to its closing boundary, has arrived**: a body that ends early, or is not multipart syntax,
is answered 400 and none of its parts is stored, not even those that came whole before the cut; they were never
acknowledged, so the client sends the request again. A whole body's parts are then stored one by one, in order,
and the answer lists each: 200 all stored, 202 some failed, 409 none stored (PS3.18 Table 10.5.3-1), with the
Failure Reasons of :mod:`dicom_node.dicomweb.status`. An instance listed in ReferencedSOPSequence is on disk,
fsynced and recorded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import threading
import time
from http import HTTPStatus
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.filereader import _read_file_meta_info, read_preamble

from dicom_node.dicomweb import status as stow_status
from dicom_node.dicomweb.multipart import MalformedMultipart, ReceivedPart, parse_media_type, read_multipart
from dicom_node.dicomweb.status import InstanceOutcome
from dicom_node.receive.receiver import ACCEPTED_TRANSFER_SYNTAXES, StoreRefused, store_instance
from dicom_node.store import audit, throttle
from dicom_node.store.database import utcnow
from dicom_node.store.spool import is_valid_uid
from dicom_node.web.auth import _DUMMY_HASH, token_digest, verify_password

LOGGER = logging.getLogger(__name__)

PREFIX = "/dicomweb/studies"
#: Bodies up to this size are read and dropped when a request is refused before its body is read, so the
#: client, which sends the whole body before it reads the answer, sees the answer rather than a reset
#: connection. A larger body is left unread (the server closes each connection after its answer).
DRAIN_LIMIT = 1 << 20
#: At most this many ``Warning`` headers (one per distinct failure reason) in an answer.
MAX_WARNINGS = 10

Response = tuple[HTTPStatus, list[tuple[str, str]], bytes]


def is_stow_path(path: str) -> bool:
    """Whether ``path`` is a STOW-RS resource of this node (``/dicomweb/studies`` or ``.../studies/{uid}``)."""
    return path.rstrip("/") == PREFIX or path.startswith(PREFIX + "/")


class _BasicCache:
    """Remembers (source, password, stored hash) triples that verified, so a client sending many requests
    with HTTP basic pays the PBKDF2 cost once, not per request. Only successes are kept, as digests."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.known: dict[str, None] = {}
        self.lock = threading.Lock()

    @staticmethod
    def key(name: str, password: str, stored: str) -> str:
        return hashlib.sha256("\x00".join((name, password, stored)).encode("utf-8")).hexdigest()

    def ok(self, name: str, password: str, stored: str) -> bool:
        key = self.key(name, password, stored)
        with self.lock:
            if key in self.known:
                return True
        if not verify_password(password, stored):
            return False
        with self.lock:
            self.known[key] = None
            while len(self.known) > self.size:
                self.known.pop(next(iter(self.known)))
        return True


def authenticate(sources: list[dict[str, Any]], authorization: str,
                 cache: _BasicCache | None = None) -> tuple[dict[str, Any] | None, str, str]:
    """Find the ``[dicomweb] sources`` entry an ``Authorization`` header proves.

    Returns
    -------
    tuple
        ``(source or None, the name claimed or "", why it failed or "")``.
    """
    scheme, _, credentials = authorization.strip().partition(" ")
    scheme = scheme.lower()
    credentials = credentials.strip()
    if scheme == "bearer" and credentials:
        digest = token_digest(credentials)
        for candidate in sources:
            token = candidate.get("token_sha256")
            if isinstance(token, str) and hmac.compare_digest(token, digest):
                return candidate, str(candidate["name"]), ""
        return None, "", "unknown bearer token"
    if scheme == "basic" and credentials:
        try:
            name, sep, password = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None, "", "malformed basic credentials"
        if not sep:
            return None, name[:64], "malformed basic credentials"
        source = next((s for s in sources if s.get("name") == name and "password_hash" in s), None)
        stored = str(source["password_hash"]) if source else _DUMMY_HASH
        # Unknown names are checked against a dummy hash too: timing does not tell which names exist.
        ok = (cache.ok(name, password, stored) if cache and source else verify_password(password, stored))
        if source is not None and ok:
            return source, name, ""
        return None, name[:64], "wrong user name or password"
    return None, "", "no credentials" if not authorization.strip() else "unsupported authorization scheme"


def basic_user_name(authorization: str) -> str:
    """The user name an HTTP basic ``Authorization`` header claims ("" for other schemes or malformed ones)."""
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        name, sep, _password = base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return name[:64] if sep else ""


def source_ae_title(source: dict[str, Any]) -> str:
    """The calling AE title recorded for instances a source stores."""
    return str(source.get("ae_title") or source["name"])[:16]


def _outcome_of_unstored(part: ReceivedPart) -> InstanceOutcome:
    """A failed outcome for a part of an incomplete body, with its UIDs when its file meta can be read."""
    sop_class = sop_uid = ""
    try:
        meta = _file_meta(part.path.read_bytes())[0]
        sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
        sop_uid = str(meta.get("MediaStorageSOPInstanceUID", ""))
    except Exception:  # noqa: BLE001 - best effort: the part failed either way
        pass
    why = "the request body ended inside this part" if not part.complete else "the request body was incomplete"
    return InstanceOutcome(sop_class, sop_uid, stow_status.FAILURE_PROCESSING, why)


def _file_meta(data: bytes) -> tuple[Any, int]:
    """The File Meta Information of a PS3.10 file's bytes and the offset of its dataset.

    Raises
    ------
    Exception
        Whatever pydicom raises when the bytes are not a PS3.10 file.
    """
    stream = BytesIO(data)
    read_preamble(stream, False)
    meta = _read_file_meta_info(stream)
    return meta, stream.tell()


class StowService:
    """The STOW-RS resource; ``node`` is the running node (its ``cfg``, ``engine`` and ``receiver``)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.basic_cache = _BasicCache()

    @property
    def cfg(self) -> Any:
        return self.node.cfg

    # --------------------------------------------------------------------------------------------- request

    def __call__(self, environ: dict[str, Any]) -> Response:
        """Answer one request whose path :func:`is_stow_path` accepted."""
        method = str(environ.get("REQUEST_METHOD", "")).upper()
        path = str(environ.get("PATH_INFO", "")).rstrip("/")
        address = str(environ.get("REMOTE_ADDR", "?"))
        if method != "POST":
            return self._refuse(environ, HTTPStatus.METHOD_NOT_ALLOWED, "STOW-RS takes POST only",
                                [("Allow", "POST")])
        study = path[len(PREFIX) + 1:] if path != PREFIX else ""
        if study and (not is_valid_uid(study) or "/" in study):
            return self._refuse(environ, HTTPStatus.NOT_FOUND, "the path is not /dicomweb/studies[/{valid UID}]")
        authorization = str(environ.get("HTTP_AUTHORIZATION", ""))
        refused = self._locked_out(environ, address, authorization)
        if refused is not None:
            return refused
        source, claimed, why = authenticate(self.cfg.dicomweb.sources, authorization, self.basic_cache)
        if source is None:
            return self._unauthorized(environ, address, claimed, why)
        if claimed and authorization.strip().lower().startswith("basic"):
            with self.node.engine.begin() as conn:
                throttle.record_success(conn, throttle.stow_subject(claimed))
        media_type, params = parse_media_type(str(environ.get("CONTENT_TYPE", "")))
        if media_type != "multipart/related" or params.get("type", "").lower() != "application/dicom":
            return self._refuse(environ, HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                'the request must be multipart/related; type="application/dicom" (PS3.10 files)')
        try:
            length = int(str(environ.get("CONTENT_LENGTH") or "-1"))
        except ValueError:
            length = -1
        if length < 0:
            return self._refuse(environ, HTTPStatus.LENGTH_REQUIRED, "send a Content-Length (chunked bodies are "
                                "not accepted)")
        limit = int(self.cfg.dicomweb.max_request_gb * 1024**3)
        if limit and length > limit:
            return self._refuse(environ, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                f"the body ({length} bytes) is larger than dicomweb.max_request_gb "
                                f"({self.cfg.dicomweb.max_request_gb}); send fewer instances per request")
        receiver = self.node.receiver
        free = receiver.spool.free_bytes()
        if free - length < receiver.min_free_bytes:
            LOGGER.warning("STOW-RS from %s (%s) refused: %d bytes would take free disk (%d) below the watermark",
                           source["name"], address, length, free)
            return self._refuse(environ, HTTPStatus.INSUFFICIENT_STORAGE,
                                f"storing {length} bytes would take free disk space below the node's watermark "
                                f"(node.min_free_disk_gb)")
        answer_type = stow_status.response_media_type(str(environ.get("HTTP_ACCEPT", "")))
        if answer_type is None:
            return self._refuse(environ, HTTPStatus.NOT_ACCEPTABLE,
                                f"the answer is {stow_status.MEDIA_JSON} or {stow_status.MEDIA_XML}")
        return self._receive(environ, source, study, length, params.get("boundary", ""), answer_type, address)

    def _receive(self, environ: dict[str, Any], source: dict[str, Any], study: str, length: int, boundary: str,
                 answer_type: str, address: str) -> Response:
        receiver = self.node.receiver
        try:
            body = read_multipart(environ["wsgi.input"], length, boundary, receiver.spool.incoming)
        except MalformedMultipart as exc:
            LOGGER.warning("STOW-RS from %s (%s): malformed multipart body: %s", source["name"], address, exc)
            return _plain(HTTPStatus.BAD_REQUEST, f"the body is not multipart/related: {exc}")
        try:
            if not body.complete:
                outcomes = [_outcome_of_unstored(part) for part in body.parts]
                LOGGER.warning("STOW-RS from %s (%s): %s; nothing of it stored (%d part(s) dropped)",
                               source["name"], address, body.problem, len(body.parts))
                return self._answer(HTTPStatus.BAD_REQUEST, outcomes, answer_type,
                                    [f"{body.problem}; nothing of the request was stored"])
            if not body.parts:
                return _plain(HTTPStatus.BAD_REQUEST, "the body holds no instance")
            outcomes = []
            for part in body.parts:
                outcomes.append(self._store_part(part, source, study))
                part.path.unlink(missing_ok=True)  # the spool has its own copy now: free the space at once
        finally:
            body.remove_files()
        stored = sum(1 for o in outcomes if o.failure is None)
        level = logging.INFO if stored == len(outcomes) else logging.WARNING
        LOGGER.log(level, "STOW-RS from %s (%s): %d of %d instance(s) stored", source["name"], address, stored,
                   len(outcomes))
        warnings = [f"{o.sop_instance_uid or 'part'}: 0x{o.failure:04X} {o.reason}" for o in outcomes
                    if o.failure is not None]
        return self._answer(stow_status.http_status(outcomes), outcomes, answer_type, warnings)

    # --------------------------------------------------------------------------------------------- one part

    def _store_part(self, part: ReceivedPart, source: dict[str, Any], study: str) -> InstanceOutcome:
        """Store one part through the C-STORE path; return its outcome."""
        receiver = self.node.receiver
        if part.media_type != "application/dicom":
            return self._failed(InstanceOutcome("", "", stow_status.FAILURE_PROCESSING,
                                                f"part is {part.media_type or 'untyped'}, not application/dicom"))
        data = part.path.read_bytes()
        try:
            meta, offset = _file_meta(data)
        except Exception as exc:  # noqa: BLE001 - any reason: the part is not a PS3.10 file
            return self._failed(InstanceOutcome("", "", stow_status.failure_reason(0xC210),
                                                f"not a DICOM file (PS3.10): {exc}"))
        sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
        sop_uid = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
        transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "")
        if transfer_syntax not in ACCEPTED_TRANSFER_SYNTAXES:
            return self._failed(InstanceOutcome(sop_class, sop_uid, stow_status.FAILURE_TRANSFER_SYNTAX,
                                                f"transfer syntax {transfer_syntax!r} is not accepted"))
        if study:
            try:
                found = str(dcmread(BytesIO(data), stop_before_pixels=True,
                                    specific_tags=[0x0020000D]).get("StudyInstanceUID", ""))
            except Exception as exc:  # noqa: BLE001
                return self._failed(InstanceOutcome(sop_class, sop_uid, stow_status.failure_reason(0xC210),
                                                    f"dataset cannot be parsed: {exc}"))
            if found != study:
                return self._failed(InstanceOutcome(sop_class, sop_uid, stow_status.FAILURE_PROCESSING,
                                                    "StudyInstanceUID is not the study of the request URL"))
        try:
            store_instance(receiver, BytesIO(memoryview(data)[offset:]), transfer_syntax, sop_class, sop_uid,
                           source_ae_title(source), self.cfg.node.ae_title)
        except StoreRefused as exc:
            return self._failed(InstanceOutcome(sop_class, sop_uid, stow_status.failure_reason(exc.status),
                                                exc.reason))
        except Exception as exc:  # never let a bug turn into an unanswered request
            LOGGER.exception("STOW-RS: unexpected error storing an instance")
            return self._failed(InstanceOutcome(sop_class, sop_uid, stow_status.FAILURE_OUT_OF_RESOURCES,
                                                f"internal error: {type(exc).__name__}"))
        receiver.count(True, len(data) - offset)
        return InstanceOutcome(sop_class, sop_uid, None)

    def _failed(self, outcome: InstanceOutcome) -> InstanceOutcome:
        self.node.receiver.count(False)
        LOGGER.warning("STOW-RS: instance %s refused with 0x%04X: %s", outcome.sop_instance_uid or "(unknown)",
                       outcome.failure, outcome.reason)
        return outcome

    # --------------------------------------------------------------------------------------------- answers

    def _answer(self, status: HTTPStatus, outcomes: list[InstanceOutcome], media_type: str,
                warnings: list[str]) -> Response:
        headers = [("Content-Type", media_type)]
        for text in list(dict.fromkeys(warnings))[:MAX_WARNINGS]:
            headers.append(("Warning", f'299 dicom-node "{_header_text(text)}"'))
        return status, headers, stow_status.render(outcomes, media_type)

    def _refuse(self, environ: dict[str, Any], status: HTTPStatus, reason: str,
                headers: list[tuple[str, str]] | None = None) -> Response:
        """Answer without storing anything; drain a small body so the client gets to read the answer."""
        try:
            length = int(str(environ.get("CONTENT_LENGTH") or "0"))
        except ValueError:
            length = 0
        extra = list(headers or [])
        if 0 < length <= DRAIN_LIMIT:
            try:
                environ["wsgi.input"].read(length)
            except OSError:
                pass
        # (A larger body stays unread: the server closes every connection after its answer.)
        status_, plain_headers, body = _plain(status, reason)
        return status_, plain_headers + extra, body

    def _locked_out(self, environ: dict[str, Any], address: str, authorization: str) -> Response | None:
        """429 when the address, or the basic user name claimed, is locked by the login throttle; else ``None``.

        Checked before the password, as for dashboard logins: while locked even the right password is refused,
        and guessing costs the node no PBKDF2 work.
        """
        claimed = basic_user_name(authorization)
        now = utcnow()
        with self.node.engine.begin() as conn:
            lock = throttle.active_lock(conn, throttle.stow_subject(claimed) if claimed else "", address, now)
            if lock is not None:
                audit.record(conn, "login.failed", f"dicomweb:{claimed or '?'}", now,
                             detail=f"STOW-RS from {address}: refused, {lock.kind} {lock.subject} locked until "
                                    f"{lock.until:%Y-%m-%d %H:%M:%S}")
        if lock is None:
            return None
        LOGGER.warning("STOW-RS from %s refused: %s %s is locked", address, lock.kind, lock.subject)
        retry = str(max(1, int((lock.until - now).total_seconds())))
        return self._refuse(environ, HTTPStatus.TOO_MANY_REQUESTS, throttle.describe(lock, now),
                            [("Retry-After", retry)])

    def _unauthorized(self, environ: dict[str, Any], address: str, claimed: str, why: str) -> Response:
        actor = f"dicomweb:{claimed or '?'}"
        LOGGER.warning("STOW-RS from %s refused: %s%s", address, why, f" (user {claimed!r})" if claimed else "")
        now = utcnow()
        with self.node.engine.begin() as conn:
            audit.record(conn, "login.failed", actor, now, detail=f"STOW-RS from {address}: {why}")
            failures, locks = throttle.record_failure(conn, throttle.Limits.from_settings(self.cfg.web),
                                                      throttle.stow_subject(claimed) if claimed else None,
                                                      address, now)
            for lock in locks:
                audit.record(conn, "login.locked", f"{lock.kind}:{lock.subject}", now, object_kind="login",
                             detail=f"too many failed STOW-RS logins (the last from {address}); locked until "
                                    f"{lock.until:%Y-%m-%d %H:%M:%S}")
        for lock in locks:
            LOGGER.warning("STOW-RS and dashboard logins of %s %s locked until %s UTC after too many failures",
                           lock.kind, lock.subject, f"{lock.until:%H:%M:%S}")
        # Each failure of a name (or, for tokens, of the address) waits longer: guessing gets slow, then locked.
        time.sleep(throttle.failure_delay(failures))
        challenge = [("WWW-Authenticate", 'Bearer realm="dicom-node STOW-RS"'),
                     ("WWW-Authenticate", 'Basic realm="dicom-node STOW-RS", charset="UTF-8"')]
        return self._refuse(environ, HTTPStatus.UNAUTHORIZED, f"authentication failed: {why}", challenge)


def _header_text(text: str) -> str:
    """Printable ASCII without quotes or backslashes, at most 200 characters: safe inside a header value."""
    cleaned = "".join(ch if 0x20 <= ord(ch) < 0x7F and ch not in '"\\' else "?" for ch in text)
    return cleaned[:200]


def _plain(status: HTTPStatus, reason: str) -> Response:
    return status, [("Content-Type", "text/plain; charset=utf-8")], (reason + "\n").encode("utf-8")
