"""deploy/: the Dockerfiles pass hadolint, the systemd unit passes systemd-analyze, the configurations are valid,
the compose file is well-formed, and the commands the images and the unit run work outside Docker.

There is no Docker engine here: the images are not built. What they run is run here instead: the entrypoint and
command (``dicom-node serve``) with the images' environment, the health check (``dicom-node health``), and the
configuration check of the build step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import PROJECT_ROOT, require_program
from tests.peers import free_port, node_command, stop_process, wait_for_port

DEPLOY = PROJECT_ROOT / "deploy"


def program(name: str) -> str:
    """A program from the virtual environment (hadolint comes from PyPI) or from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else require_program(name)


def dockerfile_instructions(path: Path) -> dict[str, list[str]]:
    """Instruction -> argument texts, continuation lines joined."""
    out: dict[str, list[str]] = {}
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.setdefault(keyword.upper(), []).append(rest.strip())
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_pass_hadolint(name: str) -> None:
    result = subprocess.run([program("hadolint"), str(DEPLOY / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    found = dockerfile_instructions(DEPLOY / name)
    assert found["USER"] == ["10001:10001"]
    assert (PROJECT_ROOT / found["COPY"][-1].split()[0]).is_file()  # the configuration it checks at build time


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (DEPLOY / "dicom-node.service").read_text()
    for option in ("User=dicom-node", "NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet=",
                   "StateDirectory=dicom-node", "SystemCallFilter=@system-service"):
        assert re.search(rf"^{re.escape(option)}$", unit, re.M), option
    # The unit's binary is /opt/dicom-node/bin/dicom-node; verify it against this checkout's.
    local = tmp_path / "dicom-node.service"
    local.write_text(unit.replace("/opt/dicom-node/bin/dicom-node", str(Path(sys.executable).parent / "dicom-node")))
    result = subprocess.run([require_program("systemd-analyze"), "verify", str(local)], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "dicom-node.service" not in result.stderr, result.stderr


@pytest.mark.parametrize("name", ["production.toml", "compose-node.toml", "dicom-node.example.toml"])
def test_configurations_are_valid(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "DICOM_NODE_NODE__DATA_DIR": str(tmp_path)}
    result = subprocess.run([*node_command(), "config", "check", str(DEPLOY / name)], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_compose_file() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "orthanc", "node", "worker"}
    assert services["node"]["command"] == ["serve", "--role", "receive,export,web"]
    assert services["worker"]["command"] == ["serve", "--role", "worker"]
    for name in ("node", "worker"):
        service = services[name]
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert service["environment"]["DICOM_NODE_NODE__DATABASE_URL"].startswith("postgresql+psycopg://")
        (config_mount,) = [v for v in service["volumes"] if v.endswith(":ro")]
        assert (DEPLOY / config_mount.split(":")[0]).is_file()
    assert services["postgres"]["healthcheck"]["test"][1] == "pg_isready"


def test_image_command_and_health_check_run_outside_docker(tmp_path: Path) -> None:
    """ENTRYPOINT + CMD with the image's environment, then its HEALTHCHECK command, against this checkout."""
    found = dockerfile_instructions(DEPLOY / "Dockerfile")
    entrypoint = json.loads(found["ENTRYPOINT"][0])
    command = json.loads(found["CMD"][0])
    health = json.loads(found["HEALTHCHECK"][0].split(" CMD ", 1)[1])
    assert entrypoint == ["dicom-node"] and health[0] == "dicom-node"
    env_text = found["ENV"][0]
    image_env = dict(re.findall(r"(\w+)=(\S+)", env_text))
    assert image_env["DICOM_NODE_WEB__BIND_ADDRESS"] == "0.0.0.0"
    bindir = str(Path(sys.executable).parent)
    web_port, dicom_port = free_port(), free_port()
    env = {**os.environ, **image_env, "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
           "DICOM_NODE_CONFIG": str(PROJECT_ROOT / "dicom_node" / "example.toml"),
           "DICOM_NODE_NODE__DATA_DIR": str(tmp_path / "data"), "DICOM_NODE_WEB__PORT": str(web_port),
           "DICOM_NODE_NODE__PORT": str(dicom_port), "DICOM_NODE_NODE__MIN_FREE_DISK_GB": "0.1"}
    assert shutil.which(entrypoint[0], path=env["PATH"])
    log = open(tmp_path / "node.log", "wb")
    proc = subprocess.Popen([*entrypoint, *command], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(web_port, timeout=60, process=proc)
        wait_for_port(dicom_port, timeout=60, process=proc)
        result = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "database" in result.stdout and "ok" in result.stdout
        status = subprocess.run(["dicom-node", "status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.stdout.startswith(f"node:    running (http://127.0.0.1:{web_port}/healthz: healthy; "
                                        f"DICOM port 127.0.0.1:{dicom_port}: accepts connections)"), status.stdout
        # The same commands say so when the node is not healthy (here: not running).
    finally:
        stop_process(proc)
        log.close()
    down = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
    assert down.returncode == 1
    assert down.stderr == f"dicom-node: node not reachable at http://127.0.0.1:{web_port}/healthz: connection refused\n"
    status = subprocess.run(["dicom-node", "status"], env=env, capture_output=True, text=True, timeout=60)
    assert status.stdout.startswith("node:    not running (")
    # The start-up log said where the dashboard is, and that nobody can log in yet (the example has no users).
    logged = (tmp_path / "node.log").read_text()
    assert f"dashboard at http://127.0.0.1:{web_port}/ (and on every other address of this host), but no user " \
           "can log in" in logged and "dicom-node web add-user NAME --role admin --config" in logged


def test_unit_documentation_is_installed_by_the_documented_steps() -> None:
    """The unit's Documentation= names a file the install steps (unit header, operator guide) put there."""
    unit = (DEPLOY / "dicom-node.service").read_text()
    guide = (PROJECT_ROOT / "docs" / "operator-guide.md").read_text()
    documented = re.findall(r"^Documentation=file://(\S+)$", unit, re.M)
    assert documented
    for path in documented:
        for text in (unit, guide):
            found = re.search(rf"install -D -m 0644 (\S+) {re.escape(path)}$", text, re.M)
            assert found, path
            assert (PROJECT_ROOT / found.group(1)).is_file()


def test_deployed_rules_use_ct_cnn_small_at_half_strength() -> None:
    """ct-cnn-small at 1.0 flattens grey-white contrast on real head CT (README): no shipped rule runs it so."""
    import tomllib

    for name in ("production.toml", "compose-node.toml", "dicom-node.example.toml"):
        for rule in tomllib.loads((DEPLOY / name).read_text()).get("rules", []):
            if rule.get("model") == "ct-cnn-small":
                assert rule.get("strength", 1.0) <= 0.5, (name, rule["name"])
