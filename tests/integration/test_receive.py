"""The receiving node against real senders: dcmtk storescu/echoscu and a raw pynetdicom SCU for bad input."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.filereader import _read_file_meta_info, read_preamble
from pynetdicom import AE
from sqlalchemy import create_engine, select

from dicom_node.store.schema import Instance, Series
from tests import malformed
from tests.fixtures.synthetic import make_ct_series
from tests.helpers import pydicom_test_file
from tests.peers import DCMTK_ENV, Peer, free_port, node_command, storescp, storescu, wait_for_port

#: storescu option that proposes exactly a file's transfer syntax first, so nothing is transcoded on the way.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
}


def dataset_bytes(path: Path) -> tuple[bytes, str, str]:
    """Encoded dataset after the file meta, its transfer syntax and SOP Instance UID."""
    raw = path.read_bytes()
    fp = io.BytesIO(raw)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    return raw[fp.tell():], str(meta.TransferSyntaxUID), str(meta.MediaStorageSOPInstanceUID)


def rows_by_sop(data_dir: Path) -> dict[str, Any]:
    engine = create_engine(f"sqlite:///{data_dir / 'dicom-node.sqlite3'}")
    with engine.connect() as conn:
        rows = {r.sop_instance_uid: r for r in conn.execute(select(Instance)).all()}
    engine.dispose()
    return rows


def send_preserving_syntax(port: int, files: list[Path], data_dir: Path, reference: Peer,
                           ae_title: str = "DENOISE") -> None:
    """Send ``files`` grouped by transfer syntax, to the node and to dcmtk's storescp, and check each group.

    storescu re-encodes some things on the way (explicit sequence lengths, no trailing padding), so "what was
    sent" is what storescp received bit-preserving from the same storescu; the node must have stored the same
    dataset bytes. Groups are checked right after they are sent: the WG04 set uses one SOP Instance UID for an
    image in all its syntaxes, and a re-send replaces the instance.
    """
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        groups[dataset_bytes(path)[1]].append(path)
    for ts, group in groups.items():
        for target_port, target_ae in ((port, ae_title), (reference.port, reference.ae_title)):
            result = storescu(target_port, target_ae, group, extra=[STORESCU_PROPOSE[ts]])
            assert result.returncode == 0, f"storescu ({ts}) to {target_ae} failed: {result.stderr[-3000:]}"
        received = {dataset_bytes(p)[2]: p for p in reference.storage.iterdir() if p.is_file()}
        assert len(received) == len({dataset_bytes(p)[2] for p in group})
        assert_stored_identically(data_dir, list(received.values()))
        for p in received.values():
            p.unlink()


def assert_stored_identically(data_dir: Path, files: list[Path]) -> None:
    """Each file's dataset (after its file meta) is stored byte for byte by the node, with its row."""
    rows = rows_by_sop(data_dir)
    for path in files:
        body, ts, sop = dataset_bytes(path)
        assert sop in rows, f"{path} has no row"
        stored_body, stored_ts, _ = dataset_bytes(data_dir / rows[sop].path)
        assert stored_ts == ts, f"{path}: stored as {stored_ts}, sent as {ts}"
        assert stored_body == body, f"{path}: stored dataset differs from what was sent"


def scu_send_raw(port: int, path: Path, ae_title: str = "DENOISE", calling: str = "RAWSCU") -> int | None:
    """Send a file's bytes unchanged with pynetdicom (it does not parse the dataset); return the status."""
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are, without decoding them
    meta = dcmread(path, stop_before_pixels=True).file_meta
    ae = AE(ae_title=calling)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    return getattr(status, "Status", None)


def echo(port: int, calling: str = "ECHOSCU", called: str = "DENOISE", extra: list[str] | None = None):
    return subprocess.run(["echoscu", "-v", "-aet", calling, "-aec", called, *(extra or []), "127.0.0.1",
                           str(port)], env=DCMTK_ENV, capture_output=True, text=True, timeout=60)


def test_300_slice_series_and_real_files_are_stored_byte_identically(node_factory, tmp_path: Path,
                                                                     shared_data: Path) -> None:
    synthetic = make_ct_series(tmp_path / "syn", n_slices=300)
    real = sorted(p for p in (shared_data / "ct").rglob("*") if p.is_file() and p.name != "DIRFILE")
    interop = sorted(p for p in (shared_data / "interop").rglob("*") if p.is_file())
    assert len(real) > 150 and len(interop) > 60
    with node_factory() as node, storescp(tmp_path / "storescp") as reference:
        send_preserving_syntax(node.port, synthetic + real + interop, node.storage, reference)
        assert echo(node.port).returncode == 0
    unique = len({dataset_bytes(p)[2] for p in synthetic + real + interop})
    log = (node.storage / "node.log").read_text()
    assert "SYNTHETIC^PHANTOM" not in log and "SYN-0001" not in log  # no patient names or IDs in logs
    stored_per_association = [int(n) for n in re.findall(r"(\d+) instance\(s\) stored, 0 refused", log)]
    assert sum(stored_per_association) == len(synthetic + real + interop)  # each file once, none refused
    status = subprocess.run([*node_command(), "status", "--json"], capture_output=True, text=True,
                            env={**os.environ, "DICOM_NODE_NODE__DATA_DIR": str(node.storage)})
    assert status.returncode == 0, status.stderr
    assert f'"instances": {unique}' in status.stdout


def test_four_senders_at_once(node_factory, tmp_path: Path) -> None:
    series = [make_ct_series(tmp_path / f"s{i}", n_slices=25, rows=128, cols=128, seed=i) for i in range(5)]
    with node_factory() as node:
        results: list[subprocess.CompletedProcess] = []
        threads = [threading.Thread(target=lambda f=f: results.append(storescu(node.port, "DENOISE", f)))
                   for f in series]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.returncode for r in results] == [0] * 5, [r.stderr[-500:] for r in results]
    assert_stored_identically(node.storage, [f for s in series for f in s])
    engine = create_engine(f"sqlite:///{node.storage / 'dicom-node.sqlite3'}")
    with engine.connect() as conn:
        assert conn.execute(select(Series)).all().__len__() == 5


def test_bad_input_gets_the_right_status_and_leaves_nothing(node_factory, tmp_path: Path) -> None:
    source = make_ct_series(tmp_path / "good", n_slices=1, rows=64, cols=64)[0]
    variants = malformed.write_variants(source, tmp_path / "bad")
    expected = {"truncated": 0xC210, "huge_length": 0xC210, "garbage_after_preamble": 0xC210,
                "wrong_vr": 0xC210, "uid_with_dots": 0xC211}
    with node_factory() as node:
        for name, path in variants.items():
            assert scu_send_raw(node.port, path) == expected[name], name
        # pydicom's own truncated test files (explicit and implicit VR), sent as they are.
        for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
            assert scu_send_raw(node.port, pydicom_test_file(name)) == 0xC210, name
        # And the node goes on serving.
        assert echo(node.port).returncode == 0
        assert scu_send_raw(node.port, source) == 0x0000
    stored = [p for p in (node.storage / "spool").rglob("*") if p.is_file()]
    assert [p.name for p in stored] == [f"{dcmread(source).SOPInstanceUID}.dcm"]
    assert "C-STORE refused with 0xC210" in (node.storage / "node.log").read_text()


def test_allow_lists_and_called_title_reject_at_association(node_factory, tmp_path: Path) -> None:
    env = {"DICOM_NODE_SECURITY__ALLOWED_CALLING_AE_TITLES": '["SCANNER1"]'}
    with node_factory(extra_env=env) as node:
        assert echo(node.port, calling="SCANNER1").returncode == 0
        denied = echo(node.port, calling="INTRUDER")
        assert denied.returncode != 0 and "Calling AE Title Not Recognized" in denied.stdout + denied.stderr
        wrong_called = echo(node.port, calling="SCANNER1", called="SOMEONE")
        assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in (
            wrong_called.stdout + wrong_called.stderr)
    with node_factory(data_dir=tmp_path / "n2", extra_env={"DICOM_NODE_SECURITY__ALLOWED_HOSTS": '["10.9.0.0/16"]'}) \
            as node:
        denied = echo(node.port)  # the connection is closed at accept: no A-ASSOCIATE-RJ, no association slot
        assert denied.returncode != 0 and "Association Accepted" not in denied.stdout + denied.stderr
    log = (tmp_path / "n2" / "node.log").read_text()
    assert "from 127.0.0.1" in log and "host not in security.allowed_hosts" in log


def test_disk_below_watermark_answers_a700(node_factory, tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "s", n_slices=3, rows=64, cols=64)
    with node_factory(extra_env={"DICOM_NODE_NODE__MIN_FREE_DISK_GB": "1000000"}) as node:
        assert scu_send_raw(node.port, files[0]) == 0xA700
        assert echo(node.port).returncode == 0
    assert not [p for p in (node.storage / "spool").rglob("*.dcm")]


def test_kill_9_mid_series_loses_nothing_acknowledged(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "s", n_slices=300, rows=256, cols=256)
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    port = free_port()
    env = {**os.environ, "DICOM_NODE_NODE__PORT": str(port), "DICOM_NODE_NODE__DATA_DIR": str(data_dir),
           "DICOM_NODE_NODE__MIN_FREE_DISK_GB": "0.1", "DICOM_NODE_WEB__PORT": "0"}
    log = open(data_dir / "node.log", "ab")
    node = subprocess.Popen([*node_command(), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_for_port(port, timeout=60, process=node)
    sender = subprocess.Popen(["storescu", "-v", "-aec", "DENOISE", "127.0.0.1", str(port), *map(str, files)],
                              env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Kill the node once about a third of the series is acknowledged.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((data_dir / "spool").rglob("*.dcm"))) < 100:
        time.sleep(0.05)
    node.send_signal(signal.SIGKILL)
    node.wait()
    output, _ = sender.communicate(timeout=120)
    acknowledged = []
    current = None
    for line in output.splitlines():
        if m := re.search(r"Sending file: (\S+)", line):
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acknowledged.append(Path(current))
    assert 50 <= len(acknowledged) < 300, f"{len(acknowledged)} acknowledged; kill came at the wrong time"

    # Restart: every acknowledged instance is on disk and in the table; the sender's retry completes the series.
    node = subprocess.Popen([*node_command(), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=60, process=node)
        assert_stored_identically(data_dir, acknowledged)
        result = storescu(port, "DENOISE", files)
        assert result.returncode == 0, result.stderr[-2000:]
    finally:
        node.terminate()
        node.wait(30)
        log.close()
    assert_stored_identically(data_dir, files)
    assert not list((data_dir / "spool" / ".incoming").iterdir())


def test_tls(node_factory, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    subj = "/CN=dicom-node-test"
    for name in ("server", "client"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(certs / f"{name}.key"), "-out", str(certs / f"{name}.crt")],
                       check=True, capture_output=True)
    env = {
        "DICOM_NODE_SECURITY__TLS": "true",
        "DICOM_NODE_SECURITY__CERTIFICATE": str(certs / "server.crt"),
        "DICOM_NODE_SECURITY__PRIVATE_KEY": str(certs / "server.key"),
        "DICOM_NODE_SECURITY__TRUSTED_CAS": str(certs / "client.crt"),
        "DICOM_NODE_SECURITY__REQUIRE_CLIENT_CERTIFICATE": "true",
    }
    del subj
    with node_factory(extra_env=env) as node:
        tls = ["+tls", str(certs / "client.key"), str(certs / "client.crt"), "+cf", str(certs / "server.crt")]
        ok = echo(node.port, extra=tls)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        files = make_ct_series(tmp_path / "s", n_slices=3, rows=64, cols=64)
        sent = storescu(node.port, "DENOISE", files, extra=tls)
        assert sent.returncode == 0, sent.stderr[-2000:]
        assert echo(node.port).returncode != 0  # plain TCP to a TLS port fails
        no_client_cert = echo(node.port, extra=["+tla", "+cf", str(certs / "server.crt")])
        assert no_client_cert.returncode != 0
    assert_stored_identically(node.storage, files)
