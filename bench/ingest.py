"""Ingest benchmark: storescu sends one 300-slice 512x512 CT series to the node, to dcmtk storescp and to Orthanc.

Each receiver is started fresh (empty storage) for each of ``--runs`` runs, so duplicates are never skipped. The
time is the wall time of ``storescu`` (association, 300 C-STOREs, release). Prints instances/s per receiver and
the node's ratio against each peer measured in the same run.

    .venv/bin/python bench/ingest.py [--slices 300] [--runs 3]

``--only node --only node-stock`` measures the event-driven reactor alone: ``node-stock`` is the node with
``node.dimse_fast_path = false`` (stock pynetdicom), started and measured in the same runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures.synthetic import make_ct_series  # noqa: E402
from tests.peers import dicom_node, orthanc, require, storescp, storescu  # noqa: E402


def timed_send(port: int, ae_title: str, files: list[Path]) -> float:
    start = time.perf_counter()
    result = storescu(port, ae_title, files)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"storescu to {ae_title} failed: {result.stderr[-2000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=["node", "node-stock", "storescp", "orthanc"], action="append")
    args = parser.parse_args()
    require("storescu", "storescp", "Orthanc")
    receivers = args.only or ["node", "storescp", "orthanc"]
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        files = make_ct_series(root / "series", n_slices=args.slices)
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"series: {len(files)} instances, {size_mb:.1f} MB; {args.runs} runs per receiver")
        rates: dict[str, list[float]] = {r: [] for r in receivers}
        for run in range(args.runs):
            for name in receivers:
                storage = root / f"{name}-{run}"
                if name == "node":
                    peer_cm = dicom_node(storage)
                elif name == "node-stock":
                    peer_cm = dicom_node(storage, extra_env={"DICOM_NODE_NODE__DIMSE_FAST_PATH": "false"})
                elif name == "storescp":
                    peer_cm = storescp(storage)
                else:
                    peer_cm = orthanc(storage)
                with peer_cm as peer:
                    elapsed = timed_send(peer.port, peer.ae_title, files)
                rates[name].append(len(files) / elapsed)
                print(f"  run {run + 1} {name:9s} {elapsed:6.2f} s  {len(files) / elapsed:7.1f} instances/s")
        print("\nmedian instances/s:")
        medians = {name: statistics.median(r) for name, r in rates.items()}
        for name, rate in medians.items():
            print(f"  {name:9s} {rate:7.1f}")
        if "node" in medians:
            for other in ("node-stock", "storescp", "orthanc"):
                if other in medians:
                    print(f"ratio node/{other}: {medians['node'] / medians[other]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
