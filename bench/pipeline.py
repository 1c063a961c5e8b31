"""Pipeline benchmark: storescu sends a 300-slice 512x512 CT series to the node, which denoises it and sends the
derived series to Orthanc. Measures the time from the end of the sender's association to the last derived instance
stored in Orthanc, minus the quiet time, split into stages from the job table, and compares it in the same run
with two peers: the model alone on the same slices (the engine's network, no I/O; timed before and after the
pipeline, averaged), and storescu sending the same derived files to the same Orthanc.

    .venv/bin/python bench/pipeline.py [--slices 300] [--model ct-cnn-small] [--models-dir DIR] [--device cpu]
                                       [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import Engine, create_engine, func, select  # noqa: E402

from dicom_node.store.schema import Export, ExportInstance, Job, Series  # noqa: E402
from tests.fixtures.synthetic import make_ct_series  # noqa: E402
from tests.peers import Peer, dicom_node, orthanc, orthanc_get, require, storescu  # noqa: E402


def orthanc_instances(peer: Peer, study_uid: str) -> dict[str, int]:
    request = urllib.request.Request(f"http://127.0.0.1:{peer.http_port}/tools/lookup", data=study_uid.encode(),
                                     method="POST")
    found = [f for f in json.loads(urllib.request.urlopen(request, timeout=30).read()) if f["Type"] == "Study"]
    if not found:
        return {}
    return {s["MainDicomTags"]["SeriesInstanceUID"]: len(s["Instances"])
            for s in orthanc_get(peer, f"/studies/{found[0]['ID']}/series")}


def job_finished(engine: Engine) -> bool:
    """Whether the node's job table holds a finished job (the table may not exist yet)."""
    try:
        with engine.connect() as conn:
            return conn.execute(select(Job.finished_at).where(Job.finished_at.is_not(None))).first() is not None
    except Exception:  # noqa: BLE001 - the node is still creating its database
        return False


def model_alone(files: list[Path], model: str, models_dir: list[str], device: str) -> tuple[float, int]:
    """Seconds for the engine's network alone on the series' slices (decoded beforehand); and the batch size."""
    import numpy as np
    import torch

    from dicom_node.denoise.cpu_memory import keep_freed_memory
    from dicom_node.denoise.engine import Engine
    from dicom_node.denoise.series import read_frames, scan
    from models.folder import load_model

    keep_freed_memory()  # as the node does (models.keep_freed_cpu_memory), so the peer is not handicapped
    series = scan(files).series[0]
    decoded = [read_frames(inst) for inst in series.instances]
    stack = np.concatenate([d[1] for d in decoded], axis=0)
    formats = [inst.formats[0] for inst in series.instances]
    engine = Engine(load_model(model, models_dir, device), device=device)
    batch = engine.batch_for(*stack.shape[1:])
    engine.denoise_frames(stack[:batch], formats[:batch], 1.0)  # warm-up
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(stack), batch):
        engine.denoise_frames(stack[i:i + batch], formats[i:i + batch], 1.0)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, batch


def run_once(args: argparse.Namespace) -> dict[str, float]:
    """One run: a fresh node and Orthanc, the series sent and timed, then both peers; prints the figures and
    returns them."""
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        files = make_ct_series(root / "series", n_slices=args.slices)
        # The model alone is timed before and after the pipeline, and the two averaged: this VM's speed drifts by
        # 10 % within minutes, and one timing taken after the pipeline moved single-run ratios by as much.
        alone_before, _batch = model_alone(files, args.model, args.models_dir, args.device)
        with orthanc(root / "orthanc") as pacs:
            config = root / "node.toml"
            config.write_text("\n".join([
                "[node]", f"quiet_seconds = {args.quiet}", "[models]",
                f"directories = {json.dumps(args.models_dir)}", f"device = {json.dumps(args.device)}",
                "[[destinations]]", 'name = "pacs"', f'ae_title = "{pacs.ae_title}"', 'host = "127.0.0.1"',
                f"port = {pacs.port}",
                "[[rules]]", 'name = "ct"', 'match = { Modality = "CT", BodyPartExamined = "(?i)^(head|brain)$" }',
                f'model = "{args.model}"',
                'destinations = ["pacs"]', f"quiet_seconds = {args.quiet}",
            ]) + "\n")
            with dicom_node(root / "node", config=config) as node:
                sent = storescu(node.port, node.ae_title, files)
                if sent.returncode != 0:
                    raise SystemExit(f"storescu failed: {sent.stderr[-2000:]}")
                t_sent = time.time()
                study_uid = str(__import__("pydicom").dcmread(files[0]).StudyInstanceUID)
                engine = create_engine(f"sqlite:///{node.storage / 'dicom-node.sqlite3'}")
                # The observer must not load the machine it measures: while the job runs, look at the node's job
                # table twice a second (a small SQLite read); Orthanc's REST API (a lookup and a series listing,
                # a few ms of CPU in Orthanc and here) is asked every 0.1 s only once the job has finished.
                deadline = time.monotonic() + 3600
                while time.monotonic() < deadline and not job_finished(engine):
                    time.sleep(0.5)
                while time.monotonic() < deadline:
                    counts = orthanc_instances(pacs, study_uid)
                    if any(n == len(files) for n in counts.values()):
                        break
                    time.sleep(0.1)
                else:
                    raise SystemExit("timed out waiting for the derived series in Orthanc")
                t_done = time.time()
                while time.monotonic() < deadline:  # the exporter records its end just after Orthanc's last answer
                    with engine.connect() as conn:
                        series = conn.execute(select(Series.__table__)).one()
                        job = conn.execute(select(Job.__table__)).one()
                        export = conn.execute(select(Export.__table__)).one()
                    if export.finished_at is not None:
                        break
                    time.sleep(0.05)
                with engine.connect() as conn:
                    first_answer, last_answer = conn.execute(
                        select(func.min(ExportInstance.sent_at), func.max(ExportInstance.sent_at))).one()
                if first_answer is None or last_answer is None:
                    raise SystemExit("the export recorded no answer from Orthanc")
                log = (node.storage / "node.log").read_text()
                outbox = sorted((node.storage / "outbox").rglob("*.dcm"))
        total = t_done - t_sent - args.quiet
        stages = {
            "assemble (after quiet time)": (series.completed_at - series.last_received_at).total_seconds() - args.quiet,
            "queue wait": (job.started_at - series.completed_at).total_seconds(),
            "job (load + model + write)": (job.finished_at - job.started_at).total_seconds(),
            "export": (export.finished_at - job.finished_at).total_seconds(),
        }
        split = re.search(r"stages: (.*)$", log, re.MULTILINE)
        print(f"series: {len(files)} x 512x512 CT; model {args.model}; quiet time {args.quiet:g} s")
        print(f"pipeline (last C-STORE response -> last derived instance in Orthanc, minus quiet): {total:.1f} s")
        for name, seconds in stages.items():
            print(f"  {name:30s} {seconds:7.1f} s")
        if split:
            print(f"  job split: {split.group(1)}")
        print(f"  export split: first answer {(first_answer - job.finished_at).total_seconds():.1f} s after the job, "
              f"last {(last_answer - first_answer).total_seconds():.1f} s after the first")
        with orthanc(root / "orthanc-peer") as peer:
            start = time.perf_counter()
            result = storescu(peer.port, peer.ae_title, outbox)
            peer_export = time.perf_counter() - start
            if result.returncode != 0:
                raise SystemExit(f"storescu of the derived files failed: {result.stderr[-1000:]}")
        alone_after, batch = model_alone(files, args.model, args.models_dir, args.device)
        alone = (alone_before + alone_after) / 2
        print(f"peer: model alone on the same {len(files)} slices (batch {batch}): {alone:.1f} s "
              f"(mean of {alone_before:.1f} s before the pipeline and {alone_after:.1f} s after)")
        print(f"peer: storescu sending the {len(outbox)} derived files to Orthanc (one association): "
              f"{peer_export:.1f} s")
        print(f"ratio pipeline / model alone: {total / alone:.2f}")
        print(f"ratio node export / storescu export: {stages['export'] / peer_export:.2f}")
    return {"pipeline": total, "alone": alone, "ratio": total / alone}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--model", default="ct-cnn-small")
    parser.add_argument("--models-dir", action="append", default=[])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quiet", type=float, default=2.0, help="the rule's quiet time in seconds")
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat the whole run (fresh node, Orthanc and peers) and report the median ratio: "
                             "one run on a shared VM varies by 10-20 %%")
    args = parser.parse_args()
    require("storescu", "Orthanc")
    results = []
    for run in range(args.runs):
        if args.runs > 1:
            print(f"--- run {run + 1} of {args.runs}", flush=True)
        results.append(run_once(args))
    if args.runs > 1:
        ratios = [r["ratio"] for r in results]
        print("runs: " + ", ".join(f"{r['pipeline']:.1f} / {r['alone']:.1f} s = {r['ratio']:.2f}" for r in results))
        print(f"median ratio pipeline / model alone over {args.runs} runs: {statistics.median(ratios):.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TCP_NODELAY", "1")
    sys.exit(main())
