"""Streaming ``multipart/related`` (RFC 2387, RFC 2046 section 5.1) for STOW-RS request bodies.

The body is read from the WSGI input in blocks and split with python-multipart's streaming parser; each part's
bytes go straight to a temporary file, so a request of any size needs memory for one block only. The parser does
not accept a preamble before the first boundary (RFC 2046 allows one), so :class:`_PreambleSkipper` drops it.

A body is *complete* only when the closing delimiter (``--boundary--``) was seen and exactly ``Content-Length``
bytes arrived. The caller decides what to do with the parts of an incomplete body (the STOW-RS service stores
none of them).
"""

from __future__ import annotations

import email.message
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

#: Bytes read from the request per call.
READ_BLOCK = 1 << 20
#: Largest preamble before the first boundary that is skipped; a longer one makes the body malformed.
MAX_PREAMBLE = 64 * 1024
#: Headers per part and bytes per header line that the parser accepts.
MAX_PART_HEADERS = 32
MAX_HEADER_LINE = 8192


class MalformedMultipart(Exception):
    """The body is not ``multipart`` as its Content-Type says (the reason is the message)."""


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type header into its lower-case media type and its parameters (names lower-case).

    Quoted parameter values are unquoted (``type="application/dicom"``), as RFC 9110 8.3.1 allows either form.
    """
    message = email.message.Message()
    message["Content-Type"] = value
    media_type = message.get_content_type()  # "text/plain" when the header has no valid type
    if "/" not in value.split(";", 1)[0]:
        media_type = ""
    params = {str(k).lower(): str(v) for k, v in (message.get_params() or [])[1:]}
    return media_type, params


@dataclass
class ReceivedPart:
    """One part of a multipart body, spooled to ``path``."""

    #: Header names lower-case; the last of repeated headers wins.
    headers: dict[str, str]
    path: Path
    size: int = 0
    #: The part's closing boundary was seen (a part the body ends inside is not complete).
    complete: bool = False

    @property
    def media_type(self) -> str:
        """The part's media type, lower-case (``application/dicom``); "" when it has no Content-Type."""
        return parse_media_type(self.headers.get("content-type", ""))[0] if "content-type" in self.headers else ""


@dataclass
class MultipartBody:
    """The parts of one request body, and whether the body was whole."""

    parts: list[ReceivedPart] = field(default_factory=list)
    #: The closing delimiter was seen and every announced byte arrived.
    complete: bool = False
    #: Bytes read from the request.
    received: int = 0
    #: Why the body is incomplete ("" when complete).
    problem: str = ""

    def remove_files(self) -> None:
        """Delete every part's temporary file."""
        for part in self.parts:
            part.path.unlink(missing_ok=True)


@dataclass
class _ParserState:
    """What the parser's callbacks share: the open part file and the header being read."""

    fd: int = -1
    header_name: bytes = b""
    header_value: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    ended: bool = False


class _PreambleSkipper:
    """Drops the bytes before the first ``--boundary`` line, which python-multipart's parser refuses."""

    def __init__(self, boundary: bytes) -> None:
        self.delimiter = b"--" + boundary
        self.buffer = b""
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return data
        self.buffer += data
        if self.buffer.startswith(self.delimiter):
            self.done = True
        else:
            at = self.buffer.find(b"\r\n" + self.delimiter)
            if at < 0:
                if len(self.buffer) > MAX_PREAMBLE:
                    raise MalformedMultipart(f"no boundary in the first {MAX_PREAMBLE} bytes of the body")
                return b""
            self.buffer = self.buffer[at + 2:]
            self.done = True
        out, self.buffer = self.buffer, b""
        return out


class Readable(Protocol):
    """What a request body needs to be read: ``wsgi.input``, a file."""

    def read(self, size: int, /) -> bytes: ...


def read_multipart(stream: Readable, length: int, boundary: str, folder: Path,
                   prefix: str = "stow-") -> MultipartBody:
    """Read ``length`` bytes of a multipart body from ``stream``, spooling each part to a file in ``folder``.

    Parameters
    ----------
    stream : Readable
        The request body (``wsgi.input``); never read past ``length``.
    length : int
        The request's Content-Length.
    boundary : str
        The ``boundary`` parameter of the request's Content-Type.
    folder : Path
        Where the parts' temporary files are written (on the spool's file system, so storing is cheap).

    Returns
    -------
    MultipartBody
        Every part met, complete or not; ``complete`` says whether the body was whole. The caller removes the
        files (:meth:`MultipartBody.remove_files`).

    Raises
    ------
    MalformedMultipart
        When the bytes are not multipart syntax (the part files written so far are removed first).
    """
    if not boundary or len(boundary) > 70:
        raise MalformedMultipart("the Content-Type has no boundary parameter, or one longer than 70 characters")
    body = MultipartBody()
    state = _ParserState()

    def on_part_begin() -> None:
        state.headers = {}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state.header_name += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state.header_value += data[start:end]

    def on_header_end() -> None:
        name = state.header_name.decode("latin-1").strip().lower()
        state.headers[name] = state.header_value.decode("latin-1").strip()
        state.header_name, state.header_value = b"", b""

    def on_headers_finished() -> None:
        path = folder / f"{prefix}{uuid.uuid4().hex}.part"
        state.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        body.parts.append(ReceivedPart(dict(state.headers), path))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        view = memoryview(data)[start:end]
        while view:
            view = view[os.write(state.fd, view):]
        body.parts[-1].size += end - start

    def close_part() -> None:
        if state.fd >= 0:
            os.close(state.fd)
            state.fd = -1

    def on_part_end() -> None:
        close_part()
        body.parts[-1].complete = True

    def on_end() -> None:
        state.ended = True

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end, "on_end": on_end,
    }, max_header_count=MAX_PART_HEADERS, max_header_size=MAX_HEADER_LINE)
    skipper = _PreambleSkipper(boundary.encode("latin-1"))
    try:
        while body.received < length:
            block = stream.read(min(READ_BLOCK, length - body.received))
            if not block:
                break  # the client stopped sending before Content-Length bytes
            body.received += len(block)
            data = skipper.feed(block)
            if data and not state.ended:
                parser.write(data)
    except (MultipartParseError, MalformedMultipart, UnicodeError) as exc:
        close_part()
        body.remove_files()
        raise MalformedMultipart(str(exc) or type(exc).__name__) from exc
    except BaseException:
        close_part()
        body.remove_files()
        raise
    close_part()
    if body.received < length:
        body.problem = f"the body ended after {body.received} of {length} bytes"
    elif not state.ended:
        body.problem = "the body ended before its closing boundary"
    body.complete = not body.problem
    return body
