"""What an administrator sees while a PACS is down, and of series no rule matched (issue 14 item 8, issue 16
items 6 and 12): the CLI, ``/readyz``, ``/api/status`` and ``/metrics`` of a running node."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from dicom_node.store.schema import Export
from tests.fixtures.synthetic import make_ct_series
from tests.http import Client
from tests.integration.test_pipeline import db_rows, wait_until
from tests.integration.test_web_api import TOKEN, users_toml
from tests.peers import dicom_node, free_port, node_command, storescu, wait_for_port


def _describe(files: list[Path], study: str) -> None:
    for path in files:
        ds = dcmread(path)
        ds.StudyDescription = study
        ds.save_as(path)


def test_a_destination_that_refuses_connections_is_visible_everywhere(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path / "ct", n_slices=3, rows=32, cols=32, series_description="AXIAL 5MM")
    _describe(ct, "CT ABDOMEN")
    unmatched = make_ct_series(tmp_path / "us", n_slices=2, rows=32, cols=32, modality="OT",
                               series_description="SCREEN CAPTURE")
    web_port, dead_port = free_port(), free_port()  # nothing listens on dead_port: connections are refused
    config = tmp_path / "node.toml"
    config.write_text(
        "[node]\nquiet_seconds = 1.0\n[web]\n" + users_toml()
        + "[export]\nmax_attempts = 50\nbackoff_base_seconds = 60.0\npoll_seconds = 0.2\n"
        + f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {dead_port}\n'
        + "timeout_seconds = 2.0\n"
        + '[[rules]]\nname = "ct"\nmatch = { Modality = "CT" }\nforward_original = true\ndestinations = ["pacs"]\n'
        + "quiet_seconds = 1.0\n")
    data_dir = tmp_path / "node"
    with dicom_node(data_dir, config=config, extra_env={"DICOM_NODE_WEB__PORT": str(web_port)}) as node:
        wait_for_port(web_port, process=node.process)
        for files in (ct, unmatched):
            assert storescu(node.port, "DENOISE", files).returncode == 0
        wait_until(lambda: (rows := db_rows(data_dir, Export)) and rows[0].attempts >= 1
                   and rows[0].state.value == "queued", 60, "a failed first attempt, retrying later")
        client = Client(f"http://127.0.0.1:{web_port}")
        bearer = {"Authorization": f"Bearer {TOKEN}"}

        # /readyz: degraded, not down (the node still receives and keeps everything).
        ready = client.request("GET", "/readyz")
        assert ready.status == 200
        body = ready.json()
        assert body["status"] == "degraded" and body["checks"]["destinations"]["state"] == "degraded"
        assert "pacs" in body["checks"]["destinations"]["detail"]
        assert "retrying" in body["checks"]["destinations"]["detail"]

        # /api/status lists the retrying export with its reason, next attempt and the study it carries.
        status = client.request("GET", "/api/status", headers=bearer).json()
        (item,) = [f for f in status["failures"] if f["kind"] == "export"]
        assert item["state"] == "retrying" and "refused" in item["error"].lower()
        assert item["study_description"] == "CT ABDOMEN" and item["series_description"] == "AXIAL 5MM"
        assert item["next_attempt_seconds"] > 0

        # /metrics counts it per destination.
        text = client.request("GET", "/metrics", accept_json=False).text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        assert samples[("dicom_node_exports_retrying", (("destination", "pacs"),))] == 1

        # The CLI: `status` shows the retrying export and the series no rule matched; so does `jobs list`.
        env = {**os.environ, "DICOM_NODE_NODE__DATA_DIR": str(data_dir), "DICOM_NODE_WEB__PORT": str(web_port)}
        shown = subprocess.run([*node_command(), "status", "--config", str(config)], capture_output=True,
                               text=True, env=env, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert "retrying" in shown.stdout and "CT ABDOMEN / AXIAL 5MM" in shown.stdout
        assert "next try in" in shown.stdout and "refused" in shown.stdout.lower()
        assert "SCREEN CAPTURE: no rule matched" in shown.stdout
        listed = subprocess.run([*node_command(), "jobs", "list", "--config", str(config)], capture_output=True,
                                text=True, env=env, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert "retrying, next try in" in listed.stdout
        assert "NOT ROUTED" in listed.stdout and "SCREEN CAPTURE: no rule matched" in listed.stdout
    # The log says once per attempt what failed, without pynetdicom's two extra ERROR lines each time.
    log = (data_dir / "node.log").read_text()
    assert "to pacs, attempt 1: queued (" in log
    assert "TCP Initialisation Error" not in log and "unable to connect to remote" not in log
