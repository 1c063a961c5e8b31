"""One derived series per source series: series that grow, unchanged re-sends, new models, crash takeover.

Regression tests for issue 14 items 1-3, with real storescu as the scanner and Orthanc as the PACS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_node.store.schema import Export, ExportInstance, Job, Series
from tests.fixtures.synthetic import make_ct_series
from tests.helpers import require_program
from tests.integration.test_pipeline import db_rows, orthanc_series, send, wait_until
from tests.peers import Peer, dicom_node, free_port, node_command, orthanc, stop_process, wait_for_port


@pytest.fixture(scope="module", autouse=True)
def _orthanc_installed() -> None:
    require_program("Orthanc")


def node_config(path: Path, model_dir: Path, pacs_peer: Peer, strength: float = 1.0, quiet: float = 1.0,
                worker: dict[str, Any] | None = None) -> Path:
    """A node configuration: one CT rule to one Orthanc, short quiet time and retries."""
    worker = {"heartbeat_seconds": 1.0, "stall_timeout_seconds": 600.0, "poll_seconds": 0.2, **(worker or {})}
    lines = [
        "[node]", f"quiet_seconds = {quiet}",
        "[models]", f"directories = [{json.dumps(str(model_dir))}]", 'device = "cpu"',
        "[worker]", *(f"{k} = {json.dumps(v)}" for k, v in worker.items()),
        "[export]", "backoff_base_seconds = 1.0", "backoff_max_seconds = 3.0", "poll_seconds = 0.2",
        "[[destinations]]", 'name = "pacs"', f'ae_title = "{pacs_peer.ae_title}"', 'host = "127.0.0.1"',
        f"port = {pacs_peer.port}",
        "[[rules]]", 'name = "ct"', 'match = { Modality = "CT" }', 'model = "tiny-ct"', f"strength = {strength}",
        'destinations = ["pacs"]', f"quiet_seconds = {quiet}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def derived_series(pacs_peer: Peer, study_uid: str, source_uid: str) -> dict[str, dict[str, Any]]:
    return {uid: s for uid, s in orthanc_series(pacs_peer, study_uid).items() if uid != source_uid}


def exports_done(data_dir: Path) -> bool:
    exports = db_rows(data_dir, Export)
    return bool(exports) and all(e.state.value == "succeeded" for e in exports)


def test_a_series_that_grows_after_completion_gives_one_derived_series(tmp_path: Path, model_dir: Path) -> None:
    """Instances arriving after a version completed: never a second full derived series in PACS."""
    ct = make_ct_series(tmp_path / "ct", n_slices=12, rows=64, cols=64, series_description="BODY")
    study_uid, source_uid = str(dcmread(ct[0]).StudyInstanceUID), str(dcmread(ct[0]).SeriesInstanceUID)
    with orthanc(tmp_path / "orthanc") as pacs_peer:
        config = node_config(tmp_path / "node.toml", model_dir, pacs_peer)
        with dicom_node(tmp_path / "node", config=config) as node:
            send(node.port, ct[:4])
            wait_until(lambda: db_rows(node.storage, Job), 60, "version 1's job")
            send(node.port, ct[4:])
            wait_until(lambda: len(db_rows(node.storage, Job)) == 2, 60, "version 2's job")
            wait_until(lambda: all(j.state.value in ("succeeded", "cancelled") for j in db_rows(node.storage, Job))
                       and exports_done(node.storage), 120, "jobs finished and exports delivered")
            jobs = sorted(db_rows(node.storage, Job), key=lambda j: j.version)
            assert [j.instance_count for j in jobs] == [4, 12]
            for job in jobs:  # each job denoised exactly the instances of its own version
                if job.state.value == "succeeded":
                    assert len(list((node.storage / "outbox" / f"job-{job.id}").glob("*.dcm"))) == job.instance_count
                else:
                    assert "superseded by version 2" in job.last_error
            assert len({j.output_series_uid for j in jobs if j.state.value == "succeeded"}) == 1
            # Each derived instance went over the wire once: version 2 did not send version 1's again.
            sent = [(e.export_pk, e.sop_instance_uid) for e in db_rows(node.storage, ExportInstance)
                    if not e.error.startswith("delivered by export")]
            assert len(sent) == 12 and len({uid for _, uid in sent}) == 12
            assert all(e.status == 0 for e in db_rows(node.storage, ExportInstance))
        derived = derived_series(pacs_peer, study_uid, source_uid)
        assert len(derived) == 1, f"PACS holds {len(derived)} derived series"
        (only,) = derived.values()
        assert len(only["instances"]) == 12 and only["description"] == "BODY DN"


def test_unchanged_resend_is_idempotent_and_a_new_strength_is_a_labelled_new_series(tmp_path: Path,
                                                                                    model_dir: Path) -> None:
    """A technologist re-pushes a study: no new job, no new series. Another strength: a new, labelled series."""
    ct = make_ct_series(tmp_path / "ct", n_slices=6, rows=64, cols=64, series_description="CHEST")
    study_uid, source_uid = str(dcmread(ct[0]).StudyInstanceUID), str(dcmread(ct[0]).SeriesInstanceUID)
    data_dir = tmp_path / "node"
    with orthanc(tmp_path / "orthanc") as pacs_peer:
        config = node_config(tmp_path / "node.toml", model_dir, pacs_peer)
        with dicom_node(data_dir, config=config) as node:
            send(node.port, ct)
            wait_until(lambda: exports_done(data_dir), 120, "first delivery")
            for count in (2, 3):  # re-pushed twice, unchanged, each time after the series completed
                send(node.port, ct)
                # (wait_until calls the lambda before the loop moves on: count is the current one)
                wait_until(lambda: [(s.completion_count, s.state.value) for s in db_rows(data_dir, Series)]
                           == [(count, "complete")], 60, f"completion {count} of the same series")  # noqa: B023
            time.sleep(1.5)  # a job queued by a completion would be visible by now
            assert len(db_rows(data_dir, Job)) == 1
            (row,) = db_rows(data_dir, Series)
            assert "unchanged re-send" in row.route_note
        assert list(derived_series(pacs_peer, study_uid, source_uid).values())[0]["description"] == "CHEST DN"
        assert len(derived_series(pacs_peer, study_uid, source_uid)) == 1

        # The site lowers the strength: the same source now makes a genuinely new derived series, labelled DN2.
        config = node_config(tmp_path / "node.toml", model_dir, pacs_peer, strength=0.5)
        with dicom_node(data_dir, config=config) as node:
            send(node.port, ct)
            wait_until(lambda: len(db_rows(data_dir, Job)) == 2 and exports_done(data_dir)
                       and len(db_rows(data_dir, Export)) == 2, 120, "second derived series delivered")
        derived = derived_series(pacs_peer, study_uid, source_uid)
        assert sorted(s["description"] for s in derived.values()) == ["CHEST DN", "CHEST DN2"]
        assert all(len(s["instances"]) == 6 for s in derived.values())


def _node_in_pid_namespace(config: Path, env: dict[str, str], log: Any) -> subprocess.Popen:
    """``dicom-node serve`` as PID 1 of a new PID namespace, as in a container."""
    # --kill-child: stopping unshare (stop_process) stops the node inside too.
    return subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM", *node_command(),
                             "serve", "--config", str(config)], env=env, stdout=log, stderr=subprocess.STDOUT)


def _namespace_init(unshare: subprocess.Popen) -> int:
    """The host pid of the namespace's PID 1 (the node), the child of ``unshare``."""
    children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
    return int(wait_until(lambda: children.read_text().split(), 10, "the node inside the namespace")[0])


def test_kill_9_of_a_node_that_is_pid_1_is_taken_over_after_restart(tmp_path: Path, model_dir: Path) -> None:
    """In a container the node is always PID 1: the restart must not take its predecessor's claim for its own."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is missing")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"this kernel forbids PID namespaces: {probe.stderr.strip()}")
        pytest.skip(f"this kernel forbids PID namespaces: {probe.stderr.strip()}")
    ct = make_ct_series(tmp_path / "ct", n_slices=150, rows=512, cols=512)
    study_uid = str(dcmread(ct[0]).StudyInstanceUID)
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    port = free_port()
    with orthanc(tmp_path / "orthanc") as pacs_peer:
        # The stall sweep is out of the picture (600 s): only the lease can hand the job over in time.
        config = node_config(tmp_path / "node.toml", model_dir, pacs_peer, worker={"lease_seconds": 3.0})
        env = {**os.environ, "DICOM_NODE_NODE__PORT": str(port), "DICOM_NODE_NODE__DATA_DIR": str(data_dir),
               "DICOM_NODE_NODE__MIN_FREE_DISK_GB": "0.1", "DICOM_NODE_WEB__PORT": "0"}
        with open(data_dir / "node.log", "ab") as log:
            node = _node_in_pid_namespace(config, env, log)
            try:
                wait_for_port(port, timeout=60, process=node)
                send(port, ct)
                wait_until(lambda: any(j.state.value == "running" for j in db_rows(data_dir, Job)), 60,
                           "job running", interval=0.05)
                (job,) = db_rows(data_dir, Job)
                assert job.worker_id.split(":")[1] == "1"  # claimed by PID 1
                os.kill(_namespace_init(node), signal.SIGKILL)
                node.wait(timeout=30)
                node = _node_in_pid_namespace(config, env, log)
                wait_for_port(port, timeout=60, process=node)
                wait_until(lambda: [j.state.value for j in db_rows(data_dir, Job)] == ["succeeded"], 60,
                           "the job taken over and finished after the restart")
                wait_until(lambda: exports_done(data_dir), 60, "the export delivered")
            finally:
                stop_process(node)
        (job,) = db_rows(data_dir, Job)
        assert job.attempts == 2 and "lease" not in job.last_error
        series = orthanc_series(pacs_peer, study_uid)
        assert len(series) == 1 and len(list(series.values())[0]["instances"]) == 150
