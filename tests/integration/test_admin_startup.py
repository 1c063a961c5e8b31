"""Start-up as an administrator sees it: a start that fails leaves no trace of a configuration it never ran."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

from tests.peers import free_port, node_command, stop_process, wait_for_port


def _env(data: Path, port: int, quiet: str) -> dict[str, str]:
    return {**os.environ, "DICOM_NODE_NODE__DATA_DIR": str(data), "DICOM_NODE_NODE__PORT": str(port),
            "DICOM_NODE_NODE__MIN_FREE_DISK_GB": "0.1", "DICOM_NODE_WEB__PORT": "0",
            "DICOM_NODE_WORKER__ENABLED": "false", "DICOM_NODE_NODE__QUIET_SECONDS": quiet}


def _config_events(env: dict[str, str]) -> list[str]:
    out = subprocess.run([*node_command(), "audit", "--action", "config.", "--json"], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return [event["action"] for event in json.loads(out)]


def _serve_once(env: dict[str, str], port: int, log: Path) -> None:
    """Start the node, wait until it says it started (the port opens a little earlier), stop it."""
    seen = log.read_text().count(" started (roles ") if log.exists() else 0
    with open(log, "ab") as out:
        proc = subprocess.Popen([*node_command(), "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, timeout=60, process=proc)
            deadline = time.monotonic() + 60
            while log.read_text().count(" started (roles ") == seen:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.1)
        finally:
            stop_process(proc)


def test_a_failed_start_records_no_configuration_change(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    _serve_once(_env(data, port, "10"), port, tmp_path / "node.log")
    assert _config_events(_env(data, port, "10")) == ["config.loaded"]
    changed = _env(data, port, "20")
    with socket.socket() as squatter:  # another program holds the DICOM port
        squatter.bind(("0.0.0.0", port))
        squatter.listen()
        failed = subprocess.run([*node_command(), "serve"], env=changed, capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0
    assert _config_events(changed) == ["config.loaded"]  # the changed configuration never ran
    _serve_once(changed, port, tmp_path / "node.log")
    assert _config_events(changed) == ["config.changed", "config.loaded"]
