"""One identity (issue 17): the conformance statement, every association (the node accepting and requesting) and
every file the node writes (received and derived) carry the same Implementation Class UID and version name."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.store.schema import Job
from tests.fixtures.synthetic import make_ct_series
from tests.integration.test_pipeline import db_rows, send, wait_until
from tests.peers import dicom_node, free_port, node_command

ROOT = Path(__file__).resolve().parents[2]


def conformance_identity() -> tuple[str, str]:
    text = (ROOT / "docs" / "conformance-statement.md").read_text()
    uid = re.search(r"^\| Implementation Class UID \| ([0-9.]+) \|", text, re.M)
    name = re.search(r"^\| Implementation Version Name \| `([^`]+)` \|", text, re.M)
    assert uid and name, "the conformance statement lost its implementation rows"
    return uid.group(1), name.group(1)


def test_conformance_statement_associations_and_files_agree(tmp_path: Path, model_dir: Path) -> None:
    assert conformance_identity() == (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)
    ct = make_ct_series(tmp_path / "ct", n_slices=2, rows=32, cols=32)
    # A Verification SCP standing in for a PACS: it records what the node presents as requestor.
    seen: list[tuple[str, str]] = []
    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(Verification)
    pacs_port = free_port()
    pacs.require_called_aet = False

    def on_requested(event: evt.Event) -> None:
        seen.append((str(event.assoc.requestor.implementation_class_uid),
                     str(event.assoc.requestor.implementation_version_name)))

    server = pacs.start_server(("127.0.0.1", pacs_port), block=False,
                               evt_handlers=[(evt.EVT_REQUESTED, on_requested)])
    config = tmp_path / "node.toml"
    config.write_text(
        "[node]\nquiet_seconds = 1.0\n"
        f'[models]\ndirectories = ["{model_dir}"]\ndevice = "cpu"\n'
        f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
        '[[rules]]\nname = "ct"\nmatch = { Modality = "CT" }\nmodel = "tiny-ct"\nquiet_seconds = 1.0\n')
    try:
        with dicom_node(tmp_path / "node", config=config) as node:
            # The node as acceptor.
            scu = AE(ae_title="SCU")
            scu.add_requested_context(Verification)
            assoc = scu.associate("127.0.0.1", node.port, ae_title="DENOISE")
            assert assoc.is_established
            acceptor = (str(assoc.acceptor.implementation_class_uid), str(assoc.acceptor.implementation_version_name))
            assoc.release()
            # The node as requestor (C-ECHO of its destination, the path exports take too).
            env = {**os.environ, "DICOM_NODE_NODE__DATA_DIR": str(node.storage)}
            echoed = subprocess.run([*node_command(), "echo", "pacs", "--config", str(config)], capture_output=True,
                                    text=True, env=env, timeout=60)
            assert echoed.returncode == 0, echoed.stdout + echoed.stderr
            # Files: as received (spool) and derived (outbox).
            send(node.port, ct)
            wait_until(lambda: (jobs := db_rows(node.storage, Job)) and jobs[0].state.value == "succeeded", 120,
                       "the series denoised")
            received = sorted((node.storage / "spool").rglob("*.dcm"))
            derived = sorted((node.storage / "outbox").rglob("*.dcm"))
            assert received and derived
    finally:
        server.shutdown()
    expected = (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)
    assert acceptor == expected
    assert seen and all(s == expected for s in seen), seen
    for path in received + derived:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        assert (str(meta.ImplementationClassUID), str(meta.ImplementationVersionName)) == expected, path


def test_one_module_defines_the_identity() -> None:
    """No other module spells the UID, the version name or the manufacturer (the loop guard depends on them)."""
    offenders = []
    for path in (ROOT / "dicom_node").rglob("*.py"):
        if path.name == "identity.py":
            continue
        text = path.read_text()
        if IMPLEMENTATION_CLASS_UID in text or re.search(r'NODE_MANUFACTURER\s*=|"DICOMNODE_', text):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


