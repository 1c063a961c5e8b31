"""End to end: storescu (scanner) -> dicom-node -> Orthanc (PACS), with faults on the way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, select

from dicom_node.store.schema import Export, Job, Series
from tests.fixtures.synthetic import make_ct_series
from tests.helpers import require_program
from tests.peers import (
    Peer,
    dicom_node,
    free_port,
    node_command,
    orthanc,
    orthanc_get,
    start_orthanc,
    stop_process,
    storescu,
    wait_for_port,
)


@pytest.fixture(scope="module", autouse=True)
def _orthanc_installed() -> None:
    require_program("Orthanc")


def write_config(path: Path, model_dir: Path, destinations: list[dict[str, Any]], rules: list[dict[str, Any]],
                 extra: str = "") -> Path:
    lines = ["[node]", "quiet_seconds = 1.0", "[models]", f"directories = [{json.dumps(str(model_dir))}]",
             "device = \"cpu\"", "[worker]", "heartbeat_seconds = 1.0", "stall_timeout_seconds = 5.0",
             "poll_seconds = 0.2", "[export]", "backoff_base_seconds = 1.0", "backoff_max_seconds = 3.0",
             "max_attempts = 100", "poll_seconds = 0.2", "stall_timeout_seconds = 10.0", extra]
    for dest in destinations:
        lines.append("[[destinations]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in dest.items()]
    for rule in rules:
        lines.append("[[rules]]")
        for k, v in rule.items():
            if isinstance(v, dict):
                v = "{ " + ", ".join(f"{mk} = {json.dumps(mv)}" for mk, mv in v.items()) + " }"
                lines.append(f"{k} = {v}")
            else:
                lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def pacs(peer: Peer, name: str = "pacs") -> dict[str, Any]:
    return {"name": name, "ae_title": peer.ae_title, "host": "127.0.0.1", "port": peer.port,
            "timeout_seconds": 10.0}


CT_RULE = {"name": "ct", "match": {"Modality": "CT"}, "model": "tiny-ct", "strength": 1.0,
           "destinations": ["pacs"], "quiet_seconds": 1.0, "forward_original": True}


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def orthanc_series(peer: Peer, study_uid: str) -> dict[str, dict[str, Any]]:
    """SeriesInstanceUID -> {description, instances: [orthanc ids]} of a study in Orthanc."""
    found = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{peer.http_port}/tools/lookup", data=study_uid.encode(), method="POST"),
        timeout=30).read())
    studies = [f for f in found if f["Type"] == "Study"]
    if not studies:
        return {}
    out = {}
    for series in orthanc_get(peer, f"/studies/{studies[0]['ID']}/series"):
        tags = series["MainDicomTags"]
        out[tags["SeriesInstanceUID"]] = {"description": tags.get("SeriesDescription", ""),
                                          "instances": series["Instances"]}
    return out


def db_rows(data_dir: Path, table: Any) -> list[Any]:
    engine = create_engine(f"sqlite:///{data_dir / 'dicom-node.sqlite3'}")
    with engine.connect() as conn:
        rows = list(conn.execute(select(table.__table__)))
    engine.dispose()
    return rows


def send(port: int, files: list[Path]) -> None:
    result = storescu(port, "DENOISE", files)
    assert result.returncode == 0, result.stderr[-2000:]


def test_series_reaches_pacs_denoised_beside_the_original(tmp_path: Path, model_dir: Path) -> None:
    ct = make_ct_series(tmp_path / "ct", n_slices=12, rows=96, cols=96, series_description="HEAD 1MM")
    mr = make_ct_series(tmp_path / "mr", n_slices=3, rows=32, cols=32, modality="MR",
                        study_uid=str(dcmread(ct[0]).StudyInstanceUID), series_description="T1")
    study_uid = str(dcmread(ct[0]).StudyInstanceUID)
    with orthanc(tmp_path / "orthanc") as pacs_peer:
        config = write_config(tmp_path / "node.toml", model_dir, [pacs(pacs_peer)], [CT_RULE])
        with dicom_node(tmp_path / "node", config=config) as node:
            send(node.port, ct + mr)
            series = wait_until(lambda: (s := orthanc_series(pacs_peer, study_uid)) and len(s) == 2 and
                                all(len(v["instances"]) == 12 for v in s.values()) and s, 120,
                                "original and derived series in Orthanc")
            source_uid = str(dcmread(ct[0]).SeriesInstanceUID)
            assert source_uid in series and str(dcmread(mr[0]).SeriesInstanceUID) not in series
            (derived_uid,) = [uid for uid in series if uid != source_uid]
            assert series[derived_uid]["description"] == "HEAD 1MM DN"
            sources = {str(dcmread(p).SOPInstanceUID) for p in ct}
            referenced = set()
            for instance_id in series[derived_uid]["instances"]:
                tags = orthanc_get(pacs_peer, f"/instances/{instance_id}/simplified-tags")
                assert tags["StudyInstanceUID"] == study_uid
                assert tags["ImageType"].startswith("DERIVED\\SECONDARY")
                for item in tags["SourceImageSequence"]:
                    referenced.add(item["ReferencedSOPInstanceUID"])
            assert referenced == sources

            # The node's own output sent back to it is not denoised again (loop guard).
            outbox = sorted((node.storage / "outbox").rglob("*.dcm"))
            assert len(outbox) == 12
            send(node.port, outbox)
            wait_until(lambda: any(r.series_uid == derived_uid and r.state.value == "complete"
                                   for r in db_rows(node.storage, Series)), 60, "derived series complete at node")
            time.sleep(2)
            jobs = db_rows(node.storage, Job)
            assert len(jobs) == 1 and jobs[0].state.value == "succeeded"
            returned = [r for r in db_rows(node.storage, Series) if r.series_uid == derived_uid][0]
            assert returned.is_node_output and "loop guard" in returned.route_note
            mr_row = [r for r in db_rows(node.storage, Series) if r.modality == "MR"][0]
            assert mr_row.route_note == "no rule matched"
        listing = subprocess.run([*node_command(), "jobs", "list", "--config", str(config)], capture_output=True,
                                 text=True, env={**os.environ, "DICOM_NODE_NODE__DATA_DIR": str(node.storage)})
        assert listing.returncode == 0 and "succeeded" in listing.stdout and "tiny-ct" in listing.stdout


def test_pacs_down_then_back_and_a_dead_second_destination(tmp_path: Path, model_dir: Path) -> None:
    """Orthanc is stopped while the node exports and started again; another destination never answers."""
    ct = make_ct_series(tmp_path / "ct", n_slices=8, rows=64, cols=64)
    study_uid = str(dcmread(ct[0]).StudyInstanceUID)
    dead_port = free_port()
    with orthanc(tmp_path / "orthanc") as first:
        config_path = first.storage / "orthanc.json"
        dead = {"name": "dead", "ae_title": "NOBODY", "host": "127.0.0.1", "port": dead_port,
                "timeout_seconds": 2.0}
        rule = {**CT_RULE, "destinations": ["pacs", "dead"], "forward_original": False}
        config = write_config(tmp_path / "node.toml", model_dir, [pacs(first), dead], [rule])
    # Orthanc is down now; the node receives and denoises, and its exports fail and back off.
    with dicom_node(tmp_path / "node", config=config) as node:
        send(node.port, ct)
        wait_until(lambda: any(e.destination == "pacs" and e.attempts >= 2
                               for e in db_rows(node.storage, Export)), 90, "failed export attempts")
        exports = {e.destination: e for e in db_rows(node.storage, Export)}
        assert "cannot connect (Connection refused)" in exports["pacs"].last_error
        back = start_orthanc(config_path)
        try:
            wait_until(lambda: (s := orthanc_series(back, study_uid)) and
                       any(len(v["instances"]) == 8 for v in s.values()), 60, "delivery after Orthanc came back")
            wait_until(lambda: {e.destination: e.state.value for e in db_rows(node.storage, Export)}["pacs"]
                       == "succeeded", 30, "export marked succeeded")
            series = orthanc_series(back, study_uid)
            assert len(series) == 1 and all(len(v["instances"]) == 8 for v in series.values())
        finally:
            stop_process(back.process)
        dead_export = {e.destination: e for e in db_rows(node.storage, Export)}["dead"]
        assert dead_export.state.value in ("queued", "running") and dead_export.attempts >= 2
        assert "NOBODY@127.0.0.1" in dead_export.last_error


def test_destination_refusing_the_syntax_gets_a_transcoded_series(tmp_path: Path, model_dir: Path) -> None:
    ct = make_ct_series(tmp_path / "ct", n_slices=4, rows=64, cols=64)
    study_uid = str(dcmread(ct[0]).StudyInstanceUID)
    with orthanc(tmp_path / "orthanc", AcceptedTransferSyntaxes=["1.2.840.10008.1.2"]) as pacs_peer:
        config = write_config(tmp_path / "node.toml", model_dir, [pacs(pacs_peer)],
                              [{**CT_RULE, "forward_original": False}],
                              extra='[derived]\ntransfer_syntax = "rle-lossless"')
        with dicom_node(tmp_path / "node", config=config) as node:
            send(node.port, ct)
            series = wait_until(lambda: (s := orthanc_series(pacs_peer, study_uid)) and
                                any(len(v["instances"]) == 4 for v in s.values()) and s, 120,
                                "transcoded derived series in Orthanc")
            (only,) = series.values()
            url = f"http://127.0.0.1:{pacs_peer.http_port}/instances/{only['instances'][0]}/metadata/TransferSyntax"
            assert urllib.request.urlopen(url, timeout=30).read().decode() == "1.2.840.10008.1.2"
            outbox = sorted((node.storage / "outbox").rglob("*.dcm"))
            assert str(dcmread(outbox[0]).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.5"


def test_bad_series_fails_with_a_reason_and_the_good_ones_go_on(tmp_path: Path, model_dir: Path,
                                                              shared_data: Path) -> None:
    good = make_ct_series(tmp_path / "ct", n_slices=4, rows=64, cols=64)
    study_uid = str(dcmread(good[0]).StudyInstanceUID)
    # JPEG extended 12-bit streams of the WG04 set are known not to decode: stored, then refused with a reason.
    # (Relabelled CT so that the CT rule routes it to the model.)
    broken = dcmread(shared_data / "interop" / "wg04" / "JPLY" / "MR1_JPLY")
    broken.Modality = "CT"
    bad = [tmp_path / "broken.dcm"]
    broken.save_as(bad[0])
    with orthanc(tmp_path / "orthanc") as pacs_peer:
        config = write_config(tmp_path / "node.toml", model_dir, [pacs(pacs_peer)],
                              [{**CT_RULE, "forward_original": False}])
        with dicom_node(tmp_path / "node", config=config) as node:
            result = storescu(node.port, "DENOISE", bad, extra=["-xx"])
            assert result.returncode == 0, result.stderr[-2000:]
            send(node.port, good)
            wait_until(lambda: (s := orthanc_series(pacs_peer, study_uid)) and
                       any(len(v["instances"]) == 4 for v in s.values()), 120, "the good series in Orthanc")
            jobs = wait_until(lambda: (j := db_rows(node.storage, Job)) and len(j) == 2 and
                              all(x.state.value in ("succeeded", "failed") for x in j) and j, 60, "both jobs done")
            states = sorted(j.state.value for j in jobs)
            assert states == ["failed", "succeeded"]
            failed = [j for j in jobs if j.state.value == "failed"][0]
            assert failed.last_error and failed.attempts == 1


def test_kill_9_during_denoising_and_export_delivers_everything_once(tmp_path: Path, model_dir: Path) -> None:
    """The node is killed while a job runs, restarted, killed again while exporting, restarted."""
    # Big enough that the job (seconds) and the export are caught under way: 60 slices of 256x256 took 0.4 s to
    # denoise once the writer got faster, less than one look at the job table.
    ct = make_ct_series(tmp_path / "ct", n_slices=150, rows=512, cols=512)
    study_uid = str(dcmread(ct[0]).StudyInstanceUID)
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    port = free_port()
    with orthanc(tmp_path / "orthanc") as pacs_peer:
        config = write_config(tmp_path / "node.toml", model_dir, [pacs(pacs_peer)],
                              [{**CT_RULE, "forward_original": False}])
        env = {**os.environ, "DICOM_NODE_NODE__PORT": str(port), "DICOM_NODE_NODE__DATA_DIR": str(data_dir),
               "DICOM_NODE_NODE__MIN_FREE_DISK_GB": "0.1", "DICOM_NODE_WEB__PORT": "0"}
        log = open(data_dir / "node.log", "ab")

        def start() -> subprocess.Popen:
            proc = subprocess.Popen([*node_command(), "serve", "--config", str(config)], env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
            wait_for_port(port, timeout=60, process=proc)
            return proc

        node = start()
        try:
            send(port, ct)
            wait_until(lambda: any(j.state.value == "running" for j in db_rows(data_dir, Job)), 60, "job running",
                       interval=0.05)
            node.send_signal(signal.SIGKILL)
            node.wait()
            node = start()
            wait_until(lambda: any(e.sent_count > 0 or e.state.value == "running"
                                   for e in db_rows(data_dir, Export)), 120, "export under way", interval=0.05)
            node.send_signal(signal.SIGKILL)
            node.wait()
            node = start()
            wait_until(lambda: [e.state.value for e in db_rows(data_dir, Export)] == ["succeeded"], 120,
                       "export succeeded after restarts")
        finally:
            stop_process(node)
            log.close()
        series = orthanc_series(pacs_peer, study_uid)
        assert len(series) == 1
        (derived,) = series.values()
        assert len(derived["instances"]) == 150  # every slice once: same UIDs on every re-run
        jobs = db_rows(data_dir, Job)
        assert len(jobs) == 1 and jobs[0].state.value == "succeeded" and jobs[0].attempts >= 2
