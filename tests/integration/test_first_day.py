"""An IT administrator's first day, as the README tells it (issue 16): the example configuration written by
``config example``, a dashboard user made with ``web add-user``, ``serve``; a modality set up with a wrong called
AE title is refused with a log line that says why; a head CT is denoised by the bundled model and seen on the
dashboard in headless Chromium with its preview; a rule is edited and reloaded without a restart.

Only the ports and the data folder are moved (by environment variables, as the README's configuration section
describes), so tests can run side by side.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from pydicom import dcmread

from dicom_node.store.schema import Job
from tests.fixtures.synthetic import make_ct_series
from tests.helpers import require_program
from tests.integration.test_pipeline import db_rows, wait_until
from tests.peers import free_port, node_command, stop_process, storescu, wait_for_port
from tests.webdriver import chromium

PASSWORD = "first-day-pass-1"


def head_ct(folder: Path, description: str) -> list[Path]:
    """A small synthetic head CT (the example rule denoises head CT only)."""
    files = make_ct_series(folder, n_slices=4, rows=64, cols=64, series_description=description)
    for path in files:
        ds = dcmread(path)
        ds.BodyPartExamined = "HEAD"
        ds.save_as(path)
    return files


def test_first_day_from_the_readme(tmp_path: Path) -> None:
    chromedriver = require_program("chromedriver")
    chromium_binary = require_program("chromium")
    config = tmp_path / "dicom-node.toml"
    dicom_port, web_port = free_port(), free_port()
    env = {**os.environ, "DICOM_NODE_NODE__PORT": str(dicom_port), "DICOM_NODE_WEB__PORT": str(web_port),
           "DICOM_NODE_NODE__DATA_DIR": str(tmp_path / "var"), "DICOM_NODE_NODE__MIN_FREE_DISK_GB": "0.1"}
    env.pop("DICOM_NODE_CONFIG", None)

    def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        # In the folder the administrator is in, as the README's commands are.
        return subprocess.run([*node_command(), *args], input=stdin, capture_output=True, text=True, env=env,
                              timeout=120, cwd=tmp_path)

    # 1. The README's run command, step by step: configuration, a user, serve.
    example = cli("config", "example")
    assert example.returncode == 0 and "[[rules]]" in example.stdout
    config.write_text(example.stdout)
    added = cli("web", "add-user", "admin", "--role", "admin", "--config", str(config), "--password-stdin",
                stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    assert cli("config", "check", str(config)).returncode == 0
    log_path = tmp_path / "node.log"
    with open(log_path, "ab") as log:
        node = subprocess.Popen([*node_command(), "serve", "--config", str(config)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_for_port(dicom_port, timeout=90, process=node)
        wait_for_port(web_port, timeout=30, process=node)
        wait_until(lambda: f"dashboard at http://127.0.0.1:{web_port}/: 1 user(s) can log in"
                   in log_path.read_text(), 30, "the start-up log naming the dashboard and its user")

        # 2. A modality configured with the wrong called AE title: refused, and the log says who, from where, why.
        ct = head_ct(tmp_path / "ct", "HEAD ROUTINE")
        assert storescu(dicom_port, "WRONGAE", ct).returncode != 0
        (rejected,) = [line for line in log_path.read_text().splitlines() if "WRONGAE" in line]
        assert "WARNING" in rejected and "127.0.0.1" in rejected and "node.ae_title" in rejected

        # 3. The same series to the right title: denoised by the bundled CPU model at the example's strength.
        assert storescu(dicom_port, "DENOISE", ct).returncode == 0
        data_dir = tmp_path / "var"
        job = wait_until(lambda: (jobs := db_rows(data_dir, Job)) and jobs[0].state.value == "succeeded"
                         and jobs[0], 180, "the head CT denoised")
        assert job.model == "ct-cnn-small" and job.strength == 0.5
        assert len(list((data_dir / "output").rglob("*.dcm"))) == 4  # no destination yet: the output folder

        # 4. The dashboard in Chromium: log in, the series and its preview.
        with chromium(chromedriver, chromium_binary) as browser:
            base = f"http://127.0.0.1:{web_port}"
            browser.get(base + "/")
            browser.type("#username", "admin")
            browser.type("#password", PASSWORD)
            browser.click("#login")
            browser.wait_for("#series")
            assert "HEAD ROUTINE" in browser.text("#series")
            assert browser.wait_for_image(f"preview-{job.id}") > 0
            browser.screenshot(tmp_path / "first-day-dashboard.png")
            print(f"screenshot: {tmp_path / 'first-day-dashboard.png'}")

        # 5. The administrator edits the rule (strength 0.5 -> 0.7) and reloads without a restart.
        text = config.read_text()
        edited, count = re.subn(r"(?m)^strength = 0\.5\b", "strength = 0.7", text)
        assert count == 1, "the example configuration's rule changed shape"
        config.write_text(edited)
        node.send_signal(signal.SIGHUP)
        wait_until(lambda: "config.reloaded" in cli("audit", "--action", "config.reloaded", "--config",
                                                    str(config)).stdout, 30, "the reload in the audit log")
        second = head_ct(tmp_path / "ct2", "HEAD FOLLOW-UP")
        assert storescu(dicom_port, "DENOISE", second).returncode == 0
        jobs = wait_until(lambda: (j := db_rows(data_dir, Job)) and len(j) == 2
                          and all(x.state.value == "succeeded" for x in j) and j, 180, "the second series denoised")
        assert sorted(j.strength for j in jobs) == [0.5, 0.7]
        assert node.poll() is None  # the same process all along
    finally:
        stop_process(node)
