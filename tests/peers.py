"""Start real DICOM peers (dcmtk storescp, Orthanc, the node itself) on free loopback ports.

Used by the benchmarks and the integration tests. Every dcmtk and Orthanc process gets ``TCP_NODELAY=1``:
Debian's builds otherwise leave Nagle's algorithm on and run about ten times slower on loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    """Wait until something listens on 127.0.0.1:``port``; raise ``TimeoutError`` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on port {port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """Terminate ``process`` (SIGTERM, then SIGKILL after ``timeout``)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Peer:
    """A running DICOM peer."""

    name: str
    ae_title: str
    port: int
    process: subprocess.Popen
    storage: Path
    http_port: int | None = None


@contextlib.contextmanager
def storescp(storage: Path, ae_title: str = "STORESCP") -> Iterator[Peer]:
    """dcmtk storescp writing files bit-preserving into ``storage``."""
    storage.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "-aet", ae_title, "-od", str(storage), "+B", "+xa", str(port)],
        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process=proc)
        yield Peer("storescp", ae_title, port, proc, storage)
    finally:
        stop_process(proc)


def orthanc_config(storage: Path, dicom_port: int, http_port: int, ae_title: str = "ORTHANC",
                   modalities: dict[str, list] | None = None, extra: dict[str, object] | None = None) -> Path:
    """Write an Orthanc configuration for a private instance and return its path."""
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "dicom-node-test",
        "StorageDirectory": str(storage / "db"),
        "IndexDirectory": str(storage / "db"),
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomModalities": modalities or {},
        "Plugins": [],
        "StorageCompression": False,
        "SaveJobs": False,
        "ConcurrentJobs": 2,
        "HttpTimeout": 60,
        **(extra or {}),
    }
    path = storage / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def start_orthanc(config: Path) -> Peer:
    """Start Orthanc with an existing configuration (e.g. again after stopping it); stop it with ``stop_process``."""
    settings = json.loads(config.read_text())
    storage = config.parent
    log = open(storage / "orthanc.log", "ab")
    proc = subprocess.Popen(["Orthanc", str(config)], env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_for_port(settings["HttpPort"], process=proc)
    wait_for_port(settings["DicomPort"], process=proc)
    return Peer("orthanc", settings["DicomAet"], settings["DicomPort"], proc, storage, settings["HttpPort"])


@contextlib.contextmanager
def orthanc(storage: Path, ae_title: str = "ORTHANC", **options: object) -> Iterator[Peer]:
    """A private Orthanc (Debian package) on free ports, with its own storage; ``options`` go to its config."""
    dicom_port, http_port = free_port(), free_port()
    config = orthanc_config(storage, dicom_port, http_port, ae_title, extra=options)
    peer = start_orthanc(config)
    try:
        yield peer
    finally:
        stop_process(peer.process)


#: Where Debian's ``orthanc-dicomweb`` package puts the DICOMweb plugin.
ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@contextlib.contextmanager
def orthanc_dicomweb(storage: Path, ae_title: str = "ORTHANC", **options: object) -> Iterator[Peer]:
    """A private Orthanc with its DICOMweb plugin at ``http://127.0.0.1:<http_port>/dicom-web/`` (STOW-RS,
    QIDO-RS, WADO-RS); fails naming the Debian package when the plugin is not installed."""
    if not ORTHANC_DICOMWEB_PLUGIN.is_file():
        raise RuntimeError(f"{ORTHANC_DICOMWEB_PLUGIN} is missing: install the Debian package orthanc-dicomweb")
    with orthanc(storage, ae_title, Plugins=[str(ORTHANC_DICOMWEB_PLUGIN)],
                 DicomWeb={"Enable": True, "Root": "/dicom-web/", "EnableWado": True}, **options) as peer:
        yield peer


def orthanc_get(peer: Peer, path: str) -> Any:
    """GET a path of Orthanc's REST API and decode the JSON answer."""
    with urllib.request.urlopen(f"http://127.0.0.1:{peer.http_port}{path}", timeout=30) as rsp:
        return json.loads(rsp.read())


def node_command() -> list[str]:
    """The command that runs this checkout's ``dicom-node``."""
    return [sys.executable, "-m", "dicom_node"]


@contextlib.contextmanager
def dicom_node(data_dir: Path, config: Path | None = None, ae_title: str = "DENOISE",
               extra_env: dict[str, str] | None = None, port: int | None = None) -> Iterator[Peer]:
    """Run ``dicom-node serve`` as a subprocess with its data in ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {
        **os.environ,
        "DICOM_NODE_NODE__PORT": str(port),
        "DICOM_NODE_NODE__DATA_DIR": str(data_dir),
        "DICOM_NODE_NODE__AE_TITLE": ae_title,
        "DICOM_NODE_NODE__MIN_FREE_DISK_GB": os.environ.get("DICOM_NODE_NODE__MIN_FREE_DISK_GB", "0.1"),
        "DICOM_NODE_WEB__PORT": "0",
        **(extra_env or {}),
    }
    cmd = [*node_command(), "serve"] + (["--config", str(config)] if config else [])
    log = open(data_dir / "node.log", "ab")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=60, process=proc)
        yield Peer("dicom-node", ae_title, port, proc, data_dir)
    finally:
        stop_process(proc)
        log.close()


def storescu(port: int, ae_title: str, files: list[Path], calling: str = "STORESCU",
             extra: list[str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Send ``files`` with dcmtk storescu; return the completed process (check ``returncode``)."""
    cmd = ["storescu", "-aet", calling, "-aec", ae_title, *(extra or []), "127.0.0.1", str(port),
           *map(str, files)]
    return subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)


def require(*programs: str) -> None:
    """Exit with a clear message when a peer program is missing."""
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        raise SystemExit(f"missing programs: {', '.join(missing)} (Debian packages dcmtk, orthanc)")
