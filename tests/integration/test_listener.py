"""The listener against hostile and misconfigured peers: idle connections, a bad VR, a wrong called AE title and a
port that is already taken. Real dcmtk echoscu/storescu, the node as a subprocess."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests import malformed
from tests.fixtures.synthetic import make_ct_series
from tests.integration.test_pipeline import wait_until
from tests.integration.test_receive import echo
from tests.peers import DCMTK_ENV, free_port, node_command, storescu

#: A second loopback address, so "another host" can connect without a network (Linux routes all of 127/8 to lo).
OTHER_HOST = "127.0.0.2"

#: What only the fast path does (dimse.reactor.EventDrivenServer: per-host cap, request timeout, TLS off the accept
#: loop, I/O timeouts): these tests run it even in CI's stock-pynetdicom pass, which lacks it (see the README).
FAST_PATH = {"DICOM_NODE_NODE__DIMSE_FAST_PATH": "true"}


def idle_connections(port: int, count: int, source: str = OTHER_HOST) -> list[socket.socket]:
    """Open ``count`` TCP connections to the node from ``source`` that never send anything."""
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sockets.append(sock)
    return sockets


def closed_by_peer(sock: socket.socket, wait: float) -> bool:
    """Whether the node closed ``sock`` (EOF or reset) within ``wait`` seconds, having sent it nothing."""
    readable, _, _ = select.select([sock], [], [], wait)
    if not readable:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def wait_until_closed(sockets: list[socket.socket], count: int, bound: float) -> list[socket.socket]:
    """Wait (at most ``bound`` seconds) until ``count`` of ``sockets`` are closed by the node; return those."""
    closed: list[socket.socket] = []
    deadline = time.monotonic() + bound
    while len(closed) < count and time.monotonic() < deadline:
        for sock in sockets:
            if sock not in closed and closed_by_peer(sock, 0.05):
                closed.append(sock)
    return closed


def test_idle_connections_from_an_unlisted_host_are_closed_at_accept(node_factory) -> None:
    env = {"DICOM_NODE_SECURITY__ALLOWED_HOSTS": '["127.0.0.1"]'}
    with node_factory(extra_env=env) as node:
        sockets = idle_connections(node.port, 16)
        try:
            # Every one is closed at once, never having taken an association slot ...
            closed = wait_until_closed(sockets, len(sockets), bound=20)
            assert len(closed) == len(sockets)
            # ... so an allowed host associates at once.
            allowed = echo(node.port)
            assert allowed.returncode == 0, allowed.stdout + allowed.stderr
        finally:
            for sock in sockets:
                sock.close()
    log = (node.storage / "node.log").read_text()
    assert f"{OTHER_HOST}" in log and "not in security.allowed_hosts" in log


def test_pending_connections_are_capped_per_host(node_factory) -> None:
    web_port = free_port()
    env = {"DICOM_NODE_SECURITY__MAX_PENDING_PER_HOST": "4",
           "DICOM_NODE_NODE__ASSOCIATION_REQUEST_TIMEOUT": "60", "DICOM_NODE_WEB__PORT": str(web_port), **FAST_PATH}
    with node_factory(extra_env=env) as node:
        sockets = idle_connections(node.port, 16)
        try:
            closed = wait_until_closed(sockets, 12, bound=20)
            assert len(closed) == 12  # beyond the cap of 4: closed at accept
            still_open = [s for s in sockets if s not in closed]
            assert not any(closed_by_peer(s, 0) for s in still_open)  # within the cap: waiting for their request
            allowed = echo(node.port)
            assert allowed.returncode == 0, allowed.stdout + allowed.stderr
            files = make_ct_series(node.storage.parent / "s", n_slices=2, rows=64, cols=64)
            sent = storescu(node.port, "DENOISE", files)
            assert sent.returncode == 0, sent.stderr[-2000:]
            # The administrator sees them in /metrics, not only in the throttled log.
            wait_until(lambda: closed_connections(web_port).get("too_many_pending") == 12, 30,
                       "12 connections counted as too_many_pending")
        finally:
            for sock in sockets:
                sock.close()
    log = (node.storage / "node.log").read_text()
    assert "security.max_pending_per_host" in log


def closed_connections(web_port: int) -> dict[str, float]:
    """``dicom_node_connections_closed_total`` of the node's ``/metrics``, by reason ({} until the port answers)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    return {sample.labels["reason"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "dicom_node_connections_closed_total"}


def test_a_connection_without_association_request_is_closed_after_the_timeout(node_factory) -> None:
    # pynetdicom waited 30 s (its ACSE timeout) for the A-ASSOCIATE-RQ; the node now waits this setting.
    env = {"DICOM_NODE_NODE__ASSOCIATION_REQUEST_TIMEOUT": "1", **FAST_PATH}
    with node_factory(extra_env=env) as node:
        silent = idle_connections(node.port, 1, source="127.0.0.1")[0]
        partial = idle_connections(node.port, 1, source="127.0.0.1")[0]
        partial.sendall(b"\x01\x00")  # the start of an A-ASSOCIATE-RQ, and then nothing
        trickle = idle_connections(node.port, 1, source="127.0.0.1")[0]
        trickle.sendall(b"\x01\x00" + struct.pack(">I", 200))  # an A-ASSOCIATE-RQ of 200 bytes, sent ...
        try:
            assert closed_by_peer(silent, 15)
            assert closed_by_peer(partial, 15)
            closed = False
            for _ in range(75):  # ... a byte every 0.2 s: never a second without one, never whole in 15 s
                try:
                    trickle.send(b"\x00")
                except OSError:
                    closed = True
                if closed or closed_by_peer(trickle, 0.2):
                    closed = True
                    break
            assert closed
            assert echo(node.port).returncode == 0
        finally:
            for sock in (silent, partial, trickle):
                sock.close()


def test_an_association_stalled_in_the_middle_of_a_pdu_ends_after_the_network_timeout(node_factory) -> None:
    env = {"DICOM_NODE_NODE__NETWORK_TIMEOUT": "2", "DICOM_NODE_NODE__MAX_ASSOCIATIONS": "1", **FAST_PATH}
    with node_factory(extra_env=env) as node:
        ae = AE(ae_title="STALLER")
        ae.add_requested_context(Verification)
        stalled = ae.associate("127.0.0.1", node.port, ae_title="DENOISE")
        assert stalled.is_established, "the only association slot was taken"
        # A P-DATA-TF announcing 1000 bytes, of which 10 come: pynetdicom's blocking read of the rest held the
        # association, and with it the only slot, for as long as the peer kept the connection open.
        stalled.dul.socket.socket.sendall(b"\x04\x00" + struct.pack(">I", 1000) + bytes(10))
        try:
            deadline = time.monotonic() + 30
            result = echo(node.port)
            while result.returncode != 0 and time.monotonic() < deadline:
                time.sleep(1)
                result = echo(node.port)
            assert result.returncode == 0, result.stdout + result.stderr
        finally:
            stalled.abort()


def test_an_idle_connection_does_not_stall_tls_handshakes(node_factory, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=node",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(certs / "node.key"),
                    "-out", str(certs / "node.crt")], check=True, capture_output=True)
    env = {"DICOM_NODE_SECURITY__TLS": "true", "DICOM_NODE_SECURITY__CERTIFICATE": str(certs / "node.crt"),
           "DICOM_NODE_SECURITY__PRIVATE_KEY": str(certs / "node.key"), **FAST_PATH}
    with node_factory(extra_env=env) as node:
        # One connection that never starts its TLS handshake; the handshake used to run in the accept loop.
        idle = idle_connections(node.port, 1, source="127.0.0.1")[0]
        try:
            tls = ["+tla", "+cf", str(certs / "node.crt")]
            result = subprocess.run(["echoscu", "-aec", "DENOISE", "-to", "20", "-ta", "20", *tls, "127.0.0.1",
                                     str(node.port)], env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stdout + result.stderr
        finally:
            idle.close()


def test_error_comment_of_a_bad_vr_is_one_value(node_factory, tmp_path: Path) -> None:
    source = make_ct_series(tmp_path / "good", n_slices=1, rows=64, cols=64)[0]
    ds = dcmread(source)
    body = malformed.encode_dataset(ds)
    rows = body.index(b"\x28\x00\x10\x00US")
    bad = tmp_path / "bad-vr.dcm"
    bad.write_bytes(malformed.file_bytes(ds, body[:rows + 4] + b"\x01\x02" + body[rows + 6:]))

    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # send the crafted bytes as they are
    received = bytearray()

    def keep_bytes(event) -> None:
        received.extend(event.data)

    with node_factory() as node:
        ae = AE(ae_title="RAWSCU")
        ae.add_requested_context(ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DENOISE",
                             evt_handlers=[(evt.EVT_DATA_RECV, keep_bytes)])
        assert assoc.is_established
        try:
            status = assoc.send_c_store(bad)
        finally:
            assoc.release()
    assert status.Status == 0xC210
    # The Error Comment (0000,0902) as it came over the wire (implicit VR little endian command set).
    at = bytes(received).index(b"\x00\x00\x02\x09")
    length = struct.unpack_from("<I", received, at + 4)[0]
    comment = bytes(received[at + 8:at + 8 + length]).decode("ascii").rstrip(" ")
    assert "\\" not in comment, f"the Error Comment is {comment.count(chr(92)) + 1} values: {comment!r}"
    assert len(comment) <= 64 and all(" " <= c <= "~" for c in comment), comment
    # The reason itself, as one value (pydicom split the old one at its backslashes; it arrived as a list's repr).
    assert comment.startswith("element (0028,0010) at byte"), comment
    assert "unknown VR" in comment


def test_rejected_association_is_logged_with_the_title_asked_for_and_the_reason(node_factory, tmp_path: Path) -> None:
    env = {"DICOM_NODE_SECURITY__ALLOWED_CALLING_AE_TITLES": '["STORESCU"]'}
    files = make_ct_series(tmp_path / "s", n_slices=1, rows=64, cols=64)
    with node_factory(extra_env=env) as node:
        wrong_called = storescu(node.port, "WRONGAE", files)
        assert wrong_called.returncode != 0
        unknown_calling = echo(node.port, calling="INTRUDER")
        assert unknown_calling.returncode != 0
    lines = (node.storage / "node.log").read_text().splitlines()
    rejected = [line for line in lines if "WRONGAE" in line]
    assert len(rejected) == 1, lines
    assert "WARNING" in rejected[0] and "127.0.0.1" in rejected[0] and "STORESCU" in rejected[0]
    assert "called AE title" in rejected[0] and "node.ae_title" in rejected[0]
    assert "'DENOISE'" in rejected[0]  # what it should have asked for
    (intruder,) = [line for line in lines if "INTRUDER" in line]
    assert "WARNING" in intruder and "security.allowed_calling_ae_titles" in intruder


@pytest.mark.parametrize("key", ["node.port", "web.port"])
def test_a_port_in_use_ends_in_one_line_and_exit_code_2(tmp_path: Path, key: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = {"node.port": free_port(), "web.port": free_port()}
        ports[key] = busy
        env = {**os.environ, "DICOM_NODE_NODE__DATA_DIR": str(tmp_path / "node"),
               "DICOM_NODE_NODE__MIN_FREE_DISK_GB": "0.1",
               "DICOM_NODE_NODE__BIND_ADDRESS": "127.0.0.1", "DICOM_NODE_WEB__BIND_ADDRESS": "127.0.0.1",
               "DICOM_NODE_NODE__PORT": str(ports["node.port"]), "DICOM_NODE_WEB__PORT": str(ports["web.port"])}
        result = subprocess.run([*node_command(), "serve"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    (line,) = [line for line in result.stderr.splitlines() if "in use" in line]
    assert f"{key} {busy} is already in use on 127.0.0.1" in line
