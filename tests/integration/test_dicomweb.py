"""DICOMweb end to end: STOW-RS into the node, denoised, STOW-RS out to Orthanc's DICOMweb plugin; and the faults.

The STOW-RS client here is ``requests`` with the node's own streamed multipart body
(:class:`dicom_node.dicomweb.stow_send.MultipartStream`); the receivers are the node (its web port) and Orthanc
with the Debian package ``orthanc-dicomweb``. Faults use raw sockets where the request must be cut or must not
send its body.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom import dcmread
from sqlalchemy import create_engine, select

from dicom_node.dicomweb.stow_send import MultipartStream
from dicom_node.store.schema import AuditEvent, Export, ExportInstance, Instance, Series
from dicom_node.web.auth import token_digest
from tests.fixtures.synthetic import make_ct_series
from tests.helpers import require_program
from tests.integration.test_pipeline import orthanc_series, wait_until, write_config
from tests.peers import Peer, dicom_node, free_port, node_command, orthanc_dicomweb

TOKEN = "stow-test-token"
SOURCES = f'[dicomweb]\nenabled = true\nsources = [{{ name = "ris", token_sha256 = "{token_digest(TOKEN)}" }}]\n'


@pytest.fixture(scope="module", autouse=True)
def _orthanc_installed() -> None:
    require_program("Orthanc")


def stow(url: str, files: list[Path], token: str = TOKEN, accept: str = "application/dicom+json",
         extra_parts: list[tuple[str, bytes]] | None = None) -> requests.Response:
    """POST ``files`` (and raw ``(content type, bytes)`` parts) as one STOW-RS request."""
    boundary = "test-boundary-7d1f"
    chunks = []
    for path in files:
        chunks.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    for ctype, data in extra_parts or []:
        chunks.append(f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return requests.post(url, data=b"".join(chunks), timeout=120, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": accept, "Authorization": f"Bearer {token}"})


def sequence_uids(answer: dict[str, Any], tag: str) -> dict[str, Any]:
    """SOP Instance UID -> item of ReferencedSOPSequence (``00081199``) or FailedSOPSequence (``00081198``)."""
    return {item["00081155"]["Value"][0]: item for item in answer.get(tag, {}).get("Value", [])}


def rows(data_dir: Path, table: Any) -> list[Any]:
    engine = create_engine(f"sqlite:///{data_dir / 'dicom-node.sqlite3'}")
    with engine.connect() as conn:
        found = list(conn.execute(select(table.__table__)))
    engine.dispose()
    return found


@pytest.fixture()
def stow_node(tmp_path: Path) -> Iterator[tuple[Peer, str]]:
    """A node with STOW-RS on; no rules (what is stored stays in the spool). Yields it and its STOW-RS URL."""
    config = tmp_path / "node.toml"
    config.write_text(SOURCES)
    web_port = free_port()
    with dicom_node(tmp_path / "node", config=config,
                    extra_env={"DICOM_NODE_WEB__PORT": str(web_port),
                               "DICOM_NODE_DICOMWEB__MAX_REQUEST_GB": "0"}) as node:
        wait_until(lambda: _answers(web_port), 30, "the web port")
        yield node, f"http://127.0.0.1:{web_port}/dicomweb/studies"


def _answers(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code in (200, 503)
    except requests.RequestException:
        return False


def test_stow_in_denoised_and_stow_out_to_orthanc(tmp_path: Path, model_dir: Path) -> None:
    ct = make_ct_series(tmp_path / "ct", n_slices=8, rows=64, cols=64, series_description="HEAD 1MM")
    study_uid = str(dcmread(ct[0]).StudyInstanceUID)
    sops = {str(dcmread(p).SOPInstanceUID) for p in ct}
    with orthanc_dicomweb(tmp_path / "orthanc") as pacs:
        pacs_url = f"http://127.0.0.1:{pacs.http_port}/dicom-web"
        rule = {"name": "ct", "match": {"Modality": "CT", "CallingAETitle": "ris"}, "model": "tiny-ct",
                "strength": 1.0, "destinations": ["pacs"], "quiet_seconds": 1.0, "forward_original": True}
        config = write_config(tmp_path / "node.toml", model_dir,
                              [{"name": "pacs", "type": "dicomweb", "url": pacs_url, "batch_size": 3}], [rule],
                              extra=SOURCES)
        web_port = free_port()
        with dicom_node(tmp_path / "node", config=config,
                        extra_env={"DICOM_NODE_WEB__PORT": str(web_port)}) as node:
            wait_until(lambda: _answers(web_port), 30, "the web port")
            answer = stow(f"http://127.0.0.1:{web_port}/dicomweb/studies/{study_uid}", ct)
            assert answer.status_code == 200, answer.text
            assert answer.headers["Content-Type"] == "application/dicom+json"
            body = answer.json()
            assert set(sequence_uids(body, "00081199")) == sops and "00081198" not in body
            # Receiving side: every acknowledged instance is recorded, with the source as calling AE title.
            recorded = rows(node.storage, Instance)
            assert {r.sop_instance_uid for r in recorded} == sops
            assert {r.calling_ae for r in rows(node.storage, Series)} == {"ris"}

            series = wait_until(lambda: (s := orthanc_series(pacs, study_uid)) and len(s) == 2 and
                                all(len(v["instances"]) == 8 for v in s.values()) and s, 180,
                                "original and derived series in Orthanc over STOW-RS")
            source_uid = str(dcmread(ct[0]).SeriesInstanceUID)
            (derived_uid,) = [uid for uid in series if uid != source_uid]
            assert series[derived_uid]["description"] == "HEAD 1MM DN"
            # Sending side: each instance of both exports answered 0x0000 by Orthanc's STOW-RS response.
            exports = wait_until(lambda: (e := rows(node.storage, Export)) and len(e) == 2 and
                                 all(x.state == "succeeded" for x in e) and e, 60, "both exports succeeded")
            statuses = [r.status for r in rows(node.storage, ExportInstance)]
            assert len(statuses) == 16 and set(statuses) == {0}
            assert all(x.destination == "pacs" for x in exports)

            echo = subprocess.run([*node_command(), "echo", "pacs", "--config", str(config)], capture_output=True,
                                  text=True, timeout=60)
            assert echo.returncode == 0 and "QIDO-RS success" in echo.stdout, echo.stdout + echo.stderr


def test_stow_faults_are_refused_and_nothing_unacknowledged_is_kept(stow_node: tuple[Peer, str],
                                                                    tmp_path: Path) -> None:
    node, url = stow_node
    ct = make_ct_series(tmp_path / "ct", n_slices=3, rows=32, cols=32)
    host, port = "127.0.0.1", int(url.split(":")[2].split("/")[0])

    # A wrong token: 401 with a challenge, audited like a failed login, nothing stored.
    refused = stow(url, ct, token="not-the-token")
    assert refused.status_code == 401 and "Bearer" in refused.headers["WWW-Authenticate"]
    events = [e for e in rows(node.storage, AuditEvent) if e.action == "login.failed"]
    assert events and events[-1].actor == "dicomweb:?" and "STOW-RS from 127.0.0.1" in events[-1].detail

    # Not multipart/related of application/dicom: 415.
    wrong = requests.post(url, data=b"x", headers={"Content-Type": "application/dicom",
                                                    "Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert wrong.status_code == 415

    boundary = "cut-boundary"
    whole = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p.read_bytes() + b"\r\n"
                     for p in ct) + f"--{boundary}--\r\n".encode()
    head = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}\r\n')
    cut = len(whole) - len(ct[-1].read_bytes()) // 2  # inside the last part: two parts came whole before it

    # (a) The body announces its real length but ends inside the last part, before the closing boundary.
    answer = _raw_request(host, port, head + f"Content-Length: {cut}\r\n\r\n", whole[:cut])
    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), answer[:200]
    # (b) The client stops sending before Content-Length bytes (its connection is cut).
    answer = _raw_request(host, port, head + f"Content-Length: {len(whole)}\r\n\r\n", whole[:cut])
    assert b" 400 " in answer.split(b"\r\n")[0], answer[:200]
    assert b"nothing of the request was stored" in answer
    assert rows(node.storage, Instance) == []
    assert list((node.storage / "spool").rglob("*.dcm")) == []
    assert list((node.storage / "spool" / ".incoming").iterdir()) == []

    # Bigger than the free disk allows: refused from the headers alone, before any byte of the body is sent.
    too_big = shutil.disk_usage(node.storage).free + 10 * 1024**3
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("POST", "/dicomweb/studies")
    for name, value in (("Authorization", f"Bearer {TOKEN}"), ("Content-Length", str(too_big)),
                        ("Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}')):
        conn.putheader(name, value)
    conn.endheaders()
    full = conn.getresponse()
    assert full.status == 507 and b"watermark" in full.read()
    conn.close()
    assert list((node.storage / "spool" / ".incoming").iterdir()) == []

    # A whole body with one good instance, one that is not DICOM and one of another study than the URL's: 202,
    # each part answered (XML, as asked), only the good one stored.
    other_study = make_ct_series(tmp_path / "other", n_slices=1, rows=32, cols=32, seed=5)
    study_uid = str(dcmread(ct[0]).StudyInstanceUID)
    mixed = stow(f"{url}/{study_uid}", [ct[0], other_study[0]], accept="application/dicom+xml",
                 extra_parts=[("application/dicom", b"\x00" * 132 + b"not a dicom file")])
    assert mixed.status_code == 202 and mixed.headers["Content-Type"] == "application/dicom+xml"
    assert "FailedSOPSequence" in mixed.text and "ReferencedSOPSequence" in mixed.text
    assert '<Value number="1">49680</Value>' in mixed.text  # 0xC210: not a PS3.10 file
    assert '<Value number="1">272</Value>' in mixed.text  # 0x0110: another study than the URL's
    assert {r.sop_instance_uid for r in rows(node.storage, Instance)} == {str(dcmread(ct[0]).SOPInstanceUID)}

    # The rest of the series, in a request of its own: 200, all three recorded.
    rest = stow(url, ct[1:])
    assert rest.status_code == 200 and len(sequence_uids(rest.json(), "00081199")) == 2
    assert len(rows(node.storage, Instance)) == 3


def _raw_request(host: str, port: int, head: str, body: bytes) -> bytes:
    """Send ``head`` and ``body``, stop sending (half-close), and return everything the server answers."""
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(head.encode("latin-1") + body)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


class _FlakyStow(BaseHTTPRequestHandler):
    """A STOW-RS service that answers 503 to the first request, then stores (records) what it is sent."""

    requests_seen: list[int] = []
    stored: list[str] = []
    lock = threading.Lock()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # QIDO-RS for the echo
        self.send_response(204)
        self.end_headers()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            self.requests_seen.append(len(body))
            first = len(self.requests_seen) == 1
        if first:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
        items = []
        for part in message.iter_parts():
            from io import BytesIO

            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes), "a part without a body"
            ds = dcmread(BytesIO(payload))
            with self.lock:
                self.stored.append(str(ds.SOPInstanceUID))
            items.append({"00081150": {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
                          "00081155": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]}})
        answer = json.dumps({"00081199": {"vr": "SQ", "Value": items}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


def test_destination_answering_503_then_200_gets_the_series_exactly_once(tmp_path: Path, model_dir: Path) -> None:
    ct = make_ct_series(tmp_path / "ct", n_slices=5, rows=32, cols=32)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyStow)
    _FlakyStow.requests_seen, _FlakyStow.stored = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        token_file = tmp_path / "token"
        token_file.write_text("dest-token\n")
        rule = {"name": "fwd", "match": {"Modality": "CT"}, "forward_original": True, "destinations": ["web"],
                "quiet_seconds": 1.0}
        config = write_config(tmp_path / "node.toml", model_dir,
                              [{"name": "web", "type": "dicomweb", "url": url, "auth": "bearer",
                                "token_file": str(token_file), "batch_size": 10}], [rule], extra=SOURCES)
        web_port = free_port()
        with dicom_node(tmp_path / "node", config=config, extra_env={"DICOM_NODE_WEB__PORT": str(web_port)}) as node:
            wait_until(lambda: _answers(web_port), 30, "the web port")
            assert stow(f"http://127.0.0.1:{web_port}/dicomweb/studies", ct).status_code == 200
            (export,) = wait_until(lambda: (e := rows(node.storage, Export)) and e[0].state == "succeeded" and e,
                                   90, "the export to succeed after the 503")
            assert export.attempts == 2
            assert len(_FlakyStow.requests_seen) == 2
            assert sorted(_FlakyStow.stored) == sorted(str(dcmread(p).SOPInstanceUID) for p in ct)
            assert {r.status for r in rows(node.storage, ExportInstance)} == {0}
    finally:
        server.shutdown()
        server.server_close()


def test_stow_body_from_multipart_stream_is_what_orthanc_stores(tmp_path: Path) -> None:
    """The sender's streamed body is valid multipart/related for a real STOW-RS server, in one request."""
    ct = make_ct_series(tmp_path / "ct", n_slices=3, rows=32, cols=32)
    with orthanc_dicomweb(tmp_path / "orthanc") as pacs:
        body = MultipartStream(ct)
        answer = requests.post(f"http://127.0.0.1:{pacs.http_port}/dicom-web/studies", data=body, timeout=60,
                               headers={"Content-Type": body.content_type, "Accept": "application/dicom+json"})
        assert answer.status_code == 200
        assert set(sequence_uids(answer.json(), "00081199")) == {str(dcmread(p).SOPInstanceUID) for p in ct}


def test_stow_basic_password_guessing_is_slowed_then_locked(tmp_path: Path) -> None:
    """HTTP basic on STOW-RS shares the dashboard's login throttle: five wrong passwords lock the source's name,
    the right password is then refused (429) until an administrator unlocks it."""
    from dicom_node.web.auth import hash_password

    config = tmp_path / "node.toml"
    config.write_text(f'[dicomweb]\nenabled = true\nsources = [{{ name = "cloud", password_hash = '
                      f'"{hash_password("right", iterations=1000)}" }}]\n')
    web_port = free_port()
    ct = make_ct_series(tmp_path / "ct", n_slices=1, rows=16, cols=16)
    with dicom_node(tmp_path / "node", config=config, extra_env={"DICOM_NODE_WEB__PORT": str(web_port)}) as node:
        wait_until(lambda: _answers(web_port), 30, "the web port")
        url = f"http://127.0.0.1:{web_port}/dicomweb/studies"

        def post(password: str) -> requests.Response:
            headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
                       "Authorization": "Basic " + base64.b64encode(f"cloud:{password}".encode()).decode()}
            body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + ct[0].read_bytes() + b"\r\n--b--\r\n"
            return requests.post(url, data=body, headers=headers, timeout=60)

        assert [post("guess").status_code for _ in range(5)] == [401] * 5
        locked = post("right")
        assert locked.status_code == 429 and int(locked.headers["Retry-After"]) > 0
        assert "dicomweb:cloud" in locked.text and "unlock" in locked.text
        assert rows(node.storage, Instance) == []
        events = [e.action for e in rows(node.storage, AuditEvent)]
        assert "login.locked" in events and events.count("login.failed") == 6

        unlock = subprocess.run([*node_command(), "web", "unlock", "dicomweb:cloud", "--config", str(config)],
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, "DICOM_NODE_NODE__DATA_DIR": str(node.storage)})
        assert unlock.returncode == 0, unlock.stdout + unlock.stderr
        assert post("right").status_code == 200
