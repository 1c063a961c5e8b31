"""Soak test: several senders, ``kill -9`` of the node during ingest, denoising and export, and a PACS outage;
then the exact counts (not part of CI: it takes minutes).

Each sender is a modality: it sends its own series over its own associations and, when the node goes away,
reconnects and sends again whatever was not acknowledged (as scanners do). The node runs as a subprocess with a
small CNN on the CPU, Orthanc is the PACS. Afterwards it counts, per source series:

- acknowledged: SOP Instance UIDs the node answered 0x0000 for;
- stored: of those, instances recorded in the job table with their file in the spool;
- delivered: derived instances in Orthanc whose Source Image Sequence names an acknowledged instance;
- duplicates: source instances referenced by more than one derived instance in Orthanc;
- derived series per source series in Orthanc (must be 1).

Every count must be exact (stored = delivered = acknowledged, no duplicates, one derived series each).

    .venv/bin/python bench/soak.py [--senders 4] [--slices 100] [--size 256] [--outage 20] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom import dcmread  # noqa: E402
from pynetdicom import AE  # noqa: E402
from sqlalchemy import create_engine, select  # noqa: E402

from dicom_node.store.schema import Export, Instance, Job, Series  # noqa: E402
from tests.fixtures.images import make_tiny_model  # noqa: E402
from tests.fixtures.synthetic import make_ct_series  # noqa: E402
from tests.peers import (  # noqa: E402
    Peer,
    free_port,
    node_command,
    orthanc_config,
    orthanc_get,
    require,
    start_orthanc,
    stop_process,
    wait_for_port,
)


class Sender(threading.Thread):
    """A modality sending one series until every instance is acknowledged (or ``deadline``)."""

    def __init__(self, name: str, files: list[Path], port: int, deadline: float) -> None:
        super().__init__(name=name, daemon=True)
        self.files = files
        self.port = port
        self.deadline = deadline
        self.acknowledged: set[str] = set()
        self.associations = 0
        self.aborted = 0

    def run(self) -> None:
        pending = list(self.files)
        ae = AE(ae_title=self.name[:16])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        sop_class = str(dcmread(pending[0], stop_before_pixels=True).SOPClassUID)
        ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        while pending and time.monotonic() < self.deadline:
            assoc = ae.associate("127.0.0.1", self.port, ae_title="DENOISE")
            if not assoc.is_established:
                time.sleep(0.5)  # the node is restarting
                continue
            self.associations += 1
            try:
                while pending and assoc.is_established:
                    path = pending[0]
                    ds = dcmread(path)
                    status = assoc.send_c_store(ds)
                    if status and getattr(status, "Status", None) == 0x0000:
                        self.acknowledged.add(str(ds.SOPInstanceUID))
                        pending.pop(0)
                    elif not assoc.is_established:
                        self.aborted += 1  # no answer: send it again on the next association
                    else:
                        time.sleep(0.2)  # refused (e.g. out of resources): try again
            finally:
                if assoc.is_established:
                    assoc.release()


class Node:
    """``dicom-node serve`` as a subprocess that can be killed and started again on the same data."""

    def __init__(self, config: Path, data_dir: Path, port: int) -> None:
        self.config, self.data_dir, self.port = config, data_dir, port
        self.env = {**os.environ, "DICOM_NODE_NODE__PORT": str(port), "DICOM_NODE_NODE__DATA_DIR": str(data_dir),
                    "DICOM_NODE_NODE__MIN_FREE_DISK_GB": "0.1", "DICOM_NODE_WEB__PORT": "0"}
        self.log = open(data_dir / "node.log", "ab")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([*node_command(), "serve", "--config", str(self.config)], env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, timeout=60, process=self.proc)

    def kill9(self, why: str) -> None:
        if self.proc is None:
            raise RuntimeError("kill9 before start: no node process to kill")
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        print(f"  kill -9 during {why}; restarting", flush=True)
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.log.close()


def rows(data_dir: Path, table: Any) -> list[Any]:
    engine = create_engine(f"sqlite:///{data_dir / 'dicom-node.sqlite3'}")
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(table.__table__)))
    except Exception:  # noqa: BLE001 - the database may not exist yet, or be mid-migration
        return []
    finally:
        engine.dispose()


def wait(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    print(f"  (gave up waiting for {what} after {timeout:.0f} s)", flush=True)
    return False


def orthanc_study(peer: Peer, study_uid: str) -> dict[str, list[str]]:
    """Series UID -> the Source Image Sequence SOP Instance UID of each of its instances, in Orthanc."""
    request = urllib.request.Request(f"http://127.0.0.1:{peer.http_port}/tools/lookup", data=study_uid.encode(),
                                     method="POST")
    found = [f for f in json.loads(urllib.request.urlopen(request, timeout=60).read()) if f["Type"] == "Study"]
    out: dict[str, list[str]] = {}
    for study in found:
        for series in orthanc_get(peer, f"/studies/{study['ID']}/series"):
            sources = []
            for instance in series["Instances"]:
                tags = orthanc_get(peer, f"/instances/{instance}/simplified-tags")
                for item in tags.get("SourceImageSequence", []):
                    sources.append(item["ReferencedSOPInstanceUID"])
            out[series["MainDicomTags"]["SeriesInstanceUID"]] = sources
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--slices", type=int, default=100, help="slices per sender's series")
    parser.add_argument("--size", type=int, default=256, help="rows and columns of each slice")
    parser.add_argument("--outage", type=float, default=20.0, help="seconds the PACS is down")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    require("Orthanc")
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="dicom-node-soak-"))
    print(f"soak: {args.senders} senders x {args.slices} slices of {args.size}x{args.size}, folder {base}")
    series = [make_ct_series(base / f"series-{i}", n_slices=args.slices, rows=args.size, cols=args.size, seed=i)
              for i in range(args.senders)]
    models = base / "models"
    make_tiny_model(models, name="tiny-ct", identity=False, seed=3)
    pacs_config = orthanc_config(base / "orthanc", free_port(), free_port())
    pacs = start_orthanc(pacs_config)
    settings = json.loads(pacs_config.read_text())
    config = base / "node.toml"
    config.write_text("\n".join([
        "[node]", "quiet_seconds = 3.0", "[models]", f"directories = [{json.dumps(str(models))}]",
        'device = "cpu"', "[worker]", "heartbeat_seconds = 1.0", "poll_seconds = 0.2", "lease_seconds = 6.0",
        "[export]", "backoff_base_seconds = 2.0", "backoff_max_seconds = 10.0", "max_attempts = 1000",
        "poll_seconds = 0.2",
        "[[destinations]]", 'name = "pacs"', f'ae_title = "{settings["DicomAet"]}"', 'host = "127.0.0.1"',
        f'port = {settings["DicomPort"]}', "timeout_seconds = 10.0",
        "[[rules]]", 'name = "ct"', 'match = { Modality = "CT" }', 'model = "tiny-ct"', "strength = 1.0",
        'destinations = ["pacs"]', "quiet_seconds = 3.0", ""]))
    data_dir = base / "node"
    data_dir.mkdir()
    node = Node(config, data_dir, free_port())
    node.start()
    started = time.monotonic()
    total = args.senders * args.slices
    senders = [Sender(f"MODALITY{i}", files, node.port, time.monotonic() + 900) for i, files in enumerate(series)]
    try:
        for sender in senders:
            sender.start()
        # 1. kill -9 during ingest, at a random point between a fifth and a half of the instances.
        at = rng.uniform(0.2, 0.5) * total
        wait(lambda: sum(len(s.acknowledged) for s in senders) >= at, 300, "ingest under way", 0.02)
        node.kill9(f"ingest ({sum(len(s.acknowledged) for s in senders)} of {total} acknowledged)")
        # 2. kill -9 while a job runs.
        wait(lambda: any(j.state.value == "running" for j in rows(data_dir, Job)), 600, "a running job", 0.05)
        time.sleep(rng.uniform(0.0, 0.5))
        node.kill9("denoising")
        # 3. the PACS goes away while exports are queued or under way, and comes back.
        wait(lambda: any(e.state.value in ("running", "queued") for e in rows(data_dir, Export)), 600,
             "an export", 0.05)
        stop_process(pacs.process)
        print(f"  PACS down for {args.outage:.0f} s", flush=True)
        time.sleep(args.outage)
        pacs = start_orthanc(pacs_config)
        print("  PACS back", flush=True)
        # 4. kill -9 while an export is sending.
        wait(lambda: any(e.state.value == "running" and e.sent_count > 0 for e in rows(data_dir, Export))
             or any(e.state.value == "running" for e in rows(data_dir, Export)), 600, "an export sending", 0.02)
        node.kill9("export")
        for sender in senders:
            sender.join()
        # Everything done: every job finished, every export succeeded.
        wait(lambda: (jobs := rows(data_dir, Job)) and all(j.state.value in ("succeeded", "cancelled", "failed")
                                                           for j in jobs)
             and (exports := rows(data_dir, Export)) and all(e.state.value == "succeeded" for e in exports)
             and all(s.state.value == "complete" for s in rows(data_dir, Series)), 900, "all work done", 0.5)
        elapsed = time.monotonic() - started
        # Counts.
        instances = {r.sop_instance_uid: r for r in rows(data_dir, Instance)}
        jobs = rows(data_dir, Job)
        exact = True
        print(f"\n{'series':>6} {'acknowledged':>12} {'stored':>7} {'delivered':>9} {'duplicates':>10} "
              f"{'derived series':>14} {'jobs (succeeded/superseded/failed)':>34}")
        totals = [0, 0, 0, 0]
        for i, (sender, files) in enumerate(zip(senders, series)):
            source = dcmread(files[0], stop_before_pixels=True)
            ack = sender.acknowledged
            stored = {uid for uid in ack if uid in instances and (data_dir / instances[uid].path).is_file()}
            in_pacs = orthanc_study(pacs, str(source.StudyInstanceUID))
            derived = {uid: refs for uid, refs in in_pacs.items() if uid != str(source.SeriesInstanceUID)}
            refs = [r for rs in derived.values() for r in rs]
            delivered = set(refs) & ack
            duplicates = len(refs) - len(set(refs))
            series_pk = [s.id for s in rows(data_dir, Series) if s.series_uid == str(source.SeriesInstanceUID)]
            mine = [j for j in jobs if series_pk and j.series_pk == series_pk[0]]
            states = [sum(j.state.value == s for j in mine) for s in ("succeeded", "cancelled", "failed")]
            ok = len(stored) == len(ack) == len(delivered) and duplicates == 0 and len(derived) == 1
            exact &= ok and len(ack) == len(files)
            totals = [totals[0] + len(ack), totals[1] + len(stored), totals[2] + len(delivered),
                      totals[3] + duplicates]
            print(f"{i:>6} {len(ack):>12} {len(stored):>7} {len(delivered):>9} {duplicates:>10} {len(derived):>14} "
                  f"{'/'.join(map(str, states)):>34}{'' if ok else '  <-- NOT EXACT'}")
        print(f"{'all':>6} {totals[0]:>12} {totals[1]:>7} {totals[2]:>9} {totals[3]:>10}")
        reassociations = sum(s.associations for s in senders)
        print(f"\n{total} instances sent by {args.senders} senders over {reassociations} associations "
              f"(re-sent after each kill), 3 x kill -9, PACS down {args.outage:.0f} s; {elapsed:.0f} s in all")
        print("EXACT" if exact else "NOT EXACT")
        return 0 if exact else 1
    finally:
        node.stop()
        stop_process(pacs.process)
        if not args.keep:
            import shutil

            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
