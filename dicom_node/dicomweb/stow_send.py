"""STOW-RS destinations (``type = "dicomweb"``): send a series to a DICOMweb service (PS3.18 10.5, user agent).

The instances go in batches of ``batch_size`` per ``POST {url}/studies``, each a ``multipart/related;
type="application/dicom"`` body streamed from the files as stored (no decoding, a known Content-Length, nothing
held in memory). Each instance's outcome is read from the Store Instances Response (ReferencedSOPSequence,
FailedSOPSequence) and reported through the same ``on_status(key, status, error)`` callback the C-STORE sender
uses (:func:`dicom_node.export.exporter.send_series`), so retries, back-off, per-instance status, the failed state and
``jobs retry`` work as for DIMSE destinations:

- stored: status ``0x0000`` (or its Warning Reason, ``0xB000``/``0xB006``/``0xB007``, which count as stored);
- refused: its Failure Reason (``0xA700``, ``0xC122``...) and the reason text, so the next attempt sends it again;
- a request that failed as a whole (no connection, HTTP 401/403/404/413/429/5xx): the attempt ends with that
  error and the instances not answered yet stay pending for the next attempt (a service that answered 503
  stored nothing, so nothing is stored twice).
"""

from __future__ import annotations

import base64
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dicom_node.config import DICOMWEB_AUTH, Config, Destination
from dicom_node.dicomweb import status as stow_status

LOGGER = logging.getLogger(__name__)

#: Largest ``batch_size``.
MAX_BATCH_SIZE = 1000
#: Warning Reasons that mean stored (PS3.18 Table I.2-1); they are also C-STORE warning statuses.
_STORED_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})
#: HTTP answers after which the rest of the series is not tried in this attempt.
_STOP_STATUSES = frozenset({401, 403, 404, 405, 407, 408, 413, 429})

OnStatus = Callable[[int, "int | None", str], None]


class CredentialError(Exception):
    """The destination's token or password cannot be read (the message says which key and why)."""


def destination_problems(dest: Destination, where: str) -> list[str]:
    """What is wrong with a ``dicomweb`` destination, each problem naming its key (for ``config check``)."""
    problems: list[str] = []
    if not dest.url.startswith(("http://", "https://")) or len(dest.url.split("://", 1)[1].strip("/")) == 0:
        problems.append(f"{where}.url: {dest.url!r} is not an http:// or https:// URL")
    for key in ("ae_title", "host", "port", "calling_ae_title"):
        if getattr(dest, key):
            problems.append(f"{where}.{key}: not used by type dicomweb (the service is reached at url)")
    if dest.auth not in DICOMWEB_AUTH:
        problems.append(f"{where}.auth: {dest.auth!r} is not one of {', '.join(DICOMWEB_AUTH)}")
    if dest.auth == "bearer":
        if bool(dest.token_file) == bool(dest.token_env):
            problems.append(f"{where}.token_file: auth bearer needs exactly one of token_file or token_env")
        elif dest.token_file and not Path(dest.token_file).is_file():
            problems.append(f"{where}.token_file: file {dest.token_file!r} does not exist")
    if dest.auth == "basic":
        if not dest.username:
            problems.append(f"{where}.username: required when auth is basic")
        if not dest.password_file:
            problems.append(f"{where}.password_file: required when auth is basic")
        elif not Path(dest.password_file).is_file():
            problems.append(f"{where}.password_file: file {dest.password_file!r} does not exist")
    if dest.auth == "none" and (dest.token_file or dest.token_env or dest.username or dest.password_file):
        problems.append(f"{where}.auth: is none, but credentials are configured (set auth = \"bearer\" or \"basic\")")
    if dest.ca_file and not Path(dest.ca_file).is_file():
        problems.append(f"{where}.ca_file: file {dest.ca_file!r} does not exist")
    if not 1 <= dest.batch_size <= MAX_BATCH_SIZE:
        problems.append(f"{where}.batch_size: must be 1 to {MAX_BATCH_SIZE}, not {dest.batch_size}")
    if dest.timeout_seconds <= 0:
        problems.append(f"{where}.timeout_seconds: must be positive")
    return problems


def _read_secret(path: str, key: str) -> str:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CredentialError(f"{key} {path!r} cannot be read: {exc.strerror or exc}") from exc
    if not value:
        raise CredentialError(f"{key} {path!r} is empty")
    return value


def auth_headers(dest: Destination, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The ``Authorization`` header for ``dest``, read afresh (a rotated token file is taken up at the next try).

    Raises
    ------
    CredentialError
        When the token or password cannot be read.
    """
    env = os.environ if environ is None else environ
    if dest.auth == "bearer":
        if dest.token_env:
            token = env.get(dest.token_env, "").strip()
            if not token:
                raise CredentialError(f"token_env: the environment variable {dest.token_env} is not set or empty")
        else:
            token = _read_secret(dest.token_file, "token_file")
        return {"Authorization": f"Bearer {token}"}
    if dest.auth == "basic":
        password = _read_secret(dest.password_file, "password_file")
        pair = base64.b64encode(f"{dest.username}:{password}".encode()).decode("ascii")
        return {"Authorization": f"Basic {pair}"}
    return {}


def open_session(dest: Destination) -> Any:
    """A :class:`requests.Session` for ``dest``: credentials, TLS verification with ``ca_file`` or the system CAs.

    Raises
    ------
    CredentialError
        When the token or password cannot be read.
    """
    import requests  # noqa: PLC0415 - delays requests until a send

    session = requests.Session()
    session.headers.update(auth_headers(dest))
    session.headers["User-Agent"] = "dicom-node"
    session.verify = (dest.ca_file or True) if dest.verify_tls else False
    return session


def _base(dest: Destination) -> str:
    return dest.url.rstrip("/")


class MultipartStream:
    """A ``multipart/related; type="application/dicom"`` body read from files on demand.

    Its length is known in advance (so the request has a Content-Length, which every server accepts, rather than
    chunked encoding), and :meth:`read` returns the next bytes, so a batch of any size is never held in memory.
    """

    def __init__(self, paths: list[Path], boundary: str | None = None) -> None:
        self.boundary = boundary or f"dicom-node-{uuid.uuid4().hex}"
        head = f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
        self.segments: list[bytes | Path] = []
        for path in paths:
            self.segments += [head, path, b"\r\n"]
        self.segments.append(f"--{self.boundary}--\r\n".encode("ascii"))
        self.length = sum(len(s) if isinstance(s, bytes) else s.stat().st_size for s in self.segments)
        self._chunks = self._iterate()
        self._pending = b""

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __len__(self) -> int:
        return self.length

    def _iterate(self) -> Iterator[bytes]:
        for segment in self.segments:
            if isinstance(segment, bytes):
                yield segment
                continue
            with open(segment, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk

    def read(self, size: int = -1) -> bytes:
        """The next ``size`` bytes (all that is left when ``size`` < 0); ``b""`` at the end."""
        parts = [self._pending]
        have = len(self._pending)
        while size < 0 or have < size:
            chunk = next(self._chunks, b"")
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        data = b"".join(parts)
        if size < 0:
            self._pending = b""
            return data
        self._pending = data[size:]
        return data[:size]

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(1 << 20):
            yield chunk


def _reason(response: Any) -> str:
    text = " ".join((response.text or "")[:200].split())
    return f"HTTP {response.status_code} {response.reason or ''}".strip() + (f": {text}" if text else "")


def _parse(response: Any) -> stow_status.ParsedResponse | None:
    content_type = response.headers.get("Content-Type", "").lower()
    if not response.content:
        return None
    try:
        if "xml" in content_type:
            return stow_status.parse_xml_response(response.content)
        return stow_status.parse_json_response(response.content)
    except (ValueError, TypeError) as exc:
        LOGGER.warning("unreadable STOW-RS response (%s): %s", content_type, exc)
        return None


def _send_batch(session: Any, dest: Destination, batch: list[tuple[int, str, Path]], on_status: OnStatus) -> str:
    """POST one batch; report each instance's outcome; return an error text when the attempt should stop."""
    import requests  # noqa: PLC0415 - delays requests until a send

    readable: list[tuple[int, str, Path]] = []
    for key, sop, path in batch:
        if path.is_file():
            readable.append((key, sop, path))
        else:
            on_status(key, None, f"file {path} is missing")
    if not readable:
        return ""
    body = MultipartStream([path for _key, _sop, path in readable])
    url = f"{_base(dest)}/studies"
    try:
        response = session.post(url, data=body, timeout=dest.timeout_seconds,
                                headers={"Content-Type": body.content_type,
                                         "Accept": f"{stow_status.MEDIA_JSON}, {stow_status.MEDIA_XML};q=0.9"})
    except requests.RequestException as exc:
        return f"STOW-RS to {url} failed: {type(exc).__name__}: {exc}"
    code = response.status_code
    if code in _STOP_STATUSES or code >= 500:
        hint = " (check auth and the token or password)" if code in (401, 403) else (
            " (lower batch_size)" if code == 413 else "")
        return f"STOW-RS to {url}: {_reason(response)}{hint}"
    parsed = _parse(response)
    if code not in (200, 202, 409) or (parsed is None and code != 200):
        error = f"STOW-RS to {url}: {_reason(response)}"
        for key, _sop, _path in readable:
            on_status(key, None, error)
        return error
    for key, sop, _path in readable:
        if parsed is not None and sop in parsed.failed:
            reason = parsed.failed[sop]
            on_status(key, reason, f"STOW-RS failure reason 0x{reason:04X}")
        elif parsed is not None and sop in parsed.stored:
            warning = parsed.stored[sop]
            on_status(key, warning if warning in _STORED_WARNINGS else 0x0000, "")
        elif code == 200:
            on_status(key, 0x0000, "")  # 200 means every instance was stored (PS3.18 Table 10.5.3-1)
        else:
            on_status(key, None, f"not in the STOW-RS response ({_reason(response)})")
    return ""


def send_series_stow(cfg: Config, dest: Destination, files: list[tuple[int, str, Path]],
                     on_status: OnStatus) -> str:
    """Send ``files`` (key, SOP Instance UID, path) to the STOW-RS destination ``dest``.

    Calls ``on_status(key, status, error)`` for each instance answered, from this thread only. Returns an error
    text when the attempt ended before every instance was answered, else "".
    """
    try:
        session = open_session(dest)
    except CredentialError as exc:
        return f"{dest.name}: {exc}"
    try:
        for start in range(0, len(files), dest.batch_size):
            error = _send_batch(session, dest, files[start:start + dest.batch_size], on_status)
            if error:
                return error
    finally:
        session.close()
    return ""


def echo_dicomweb(dest: Destination) -> tuple[bool, str]:
    """Check a STOW-RS destination with a QIDO-RS query, ``GET {url}/studies?limit=1`` (PS3.18 10.6).

    Any 2xx answer (204 when it holds no study) means reachable, TLS trusted and credentials accepted.
    """
    import requests  # noqa: PLC0415 - delays requests until a send

    url = f"{_base(dest)}/studies?limit=1"
    where = f"{dest.name} ({_base(dest)})"
    try:
        session = open_session(dest)
    except CredentialError as exc:
        return False, f"{where}: {exc}"
    try:
        response = session.get(url, timeout=dest.timeout_seconds, headers={"Accept": stow_status.MEDIA_JSON})
    except requests.RequestException as exc:
        return False, f"{where}: QIDO-RS failed: {type(exc).__name__}: {exc}"
    finally:
        session.close()
    if 200 <= response.status_code < 300:
        return True, f"{where}: QIDO-RS success (HTTP {response.status_code})"
    return False, f"{where}: QIDO-RS failed ({_reason(response)})"
