"""STOW-RS ingest benchmark: one 300-slice 512x512 CT series POSTed to the node's STOW-RS and to Orthanc's.

Each receiver is started fresh (empty storage) for each of ``--runs`` runs. The client is the node's own STOW-RS
sender body (:class:`dicom_node.dicomweb.stow_send.MultipartStream`, streamed from the files with a
Content-Length) over ``requests``, ``--batch`` instances per request, one request at a time; the time is from the
first request to the last answer. Every answer is checked (HTTP 200, every instance in ReferencedSOPSequence).
Prints instances/s per receiver and the node's ratio against Orthanc (its DICOMweb plugin, Debian package
``orthanc-dicomweb``) measured in the same run. Not part of the test suite.

    .venv/bin/python bench/stow.py [--slices 300] [--runs 3] [--batch 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dicom_node.dicomweb.status import parse_json_response  # noqa: E402
from dicom_node.dicomweb.stow_send import MultipartStream  # noqa: E402
from dicom_node.web.auth import token_digest  # noqa: E402
from tests.fixtures.synthetic import make_ct_series  # noqa: E402
from tests.peers import dicom_node, free_port, orthanc_dicomweb, require, wait_for_port  # noqa: E402

TOKEN = "bench-token"


def timed_stow(url: str, files: list[Path], batch: int, headers: dict[str, str]) -> float:
    """POST ``files`` in batches to ``url``; return the wall time; exit when any instance is not stored."""
    session = requests.Session()
    start = time.perf_counter()
    for at in range(0, len(files), batch):
        body = MultipartStream(files[at:at + batch])
        answer = session.post(url, data=body, timeout=600,
                              headers={**headers, "Content-Type": body.content_type,
                                       "Accept": "application/dicom+json"})
        parsed = parse_json_response(answer.content) if answer.content else None
        if answer.status_code != 200 or parsed is None or len(parsed.stored) != len(body.segments) // 3:
            raise SystemExit(f"STOW-RS to {url}: HTTP {answer.status_code}: {answer.text[:500]}")
    elapsed = time.perf_counter() - start
    session.close()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=50, help="instances per STOW-RS request")
    args = parser.parse_args()
    require("Orthanc")
    with tempfile.TemporaryDirectory(prefix="bench-stow-") as tmp:
        root = Path(tmp)
        files = make_ct_series(root / "series", n_slices=args.slices)
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"series: {len(files)} instances, {size_mb:.1f} MB; {args.batch} per request; {args.runs} runs each")
        config = root / "node.toml"
        config.write_text(f'[dicomweb]\nenabled = true\nsources = [{{ name = "bench", '
                          f'token_sha256 = "{token_digest(TOKEN)}" }}]\n[worker]\nenabled = false\n')
        rates: dict[str, list[float]] = {"node": [], "orthanc": []}
        for run in range(args.runs):
            for name in rates:
                storage = root / f"{name}-{run}"
                if name == "node":
                    web_port = free_port()
                    with dicom_node(storage, config=config, extra_env={"DICOM_NODE_WEB__PORT": str(web_port)}):
                        wait_for_port(web_port)
                        elapsed = timed_stow(f"http://127.0.0.1:{web_port}/dicomweb/studies", files, args.batch,
                                             {"Authorization": f"Bearer {TOKEN}"})
                else:
                    with orthanc_dicomweb(storage) as peer:
                        elapsed = timed_stow(f"http://127.0.0.1:{peer.http_port}/dicom-web/studies", files,
                                             args.batch, {})
                rates[name].append(len(files) / elapsed)
                print(f"  run {run + 1} {name:8s} {elapsed:6.2f} s  {len(files) / elapsed:7.1f} instances/s")
        node_rate, orthanc_rate = statistics.median(rates["node"]), statistics.median(rates["orthanc"])
        print(f"median: node {node_rate:.1f} instances/s, Orthanc {orthanc_rate:.1f} instances/s; "
              f"node/Orthanc = {node_rate / orthanc_rate:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
