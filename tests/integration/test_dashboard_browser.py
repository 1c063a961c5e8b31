"""The dashboard in a real headless Chromium: log in, see a processed series with its preview, retry a failed
export once the PACS is back, and see it delivered.

The PACS (Orthanc) is down when the series is denoised, so its export fails (one attempt allowed); Orthanc is then
started, and the admin clicks Retry on the dashboard.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from pydicom import dcmread

from dicom_node.store.schema import Export, Job
from dicom_node.web.auth import hash_password
from tests.fixtures.images import make_tiny_model
from tests.fixtures.synthetic import make_ct_series
from tests.helpers import require_program
from tests.integration.test_pipeline import CT_RULE, db_rows, orthanc_series, wait_until, write_config
from tests.peers import dicom_node, free_port, orthanc_config, start_orthanc, stop_process, wait_for_port
from tests.webdriver import Browser, chromium

#: Widths the dashboard must fit without sideways scrolling: a laptop and a full-HD monitor.
LAYOUT_WIDTHS = (1280, 1920)

#: Horizontal overflow of the page and of each section (a section that scrolls sideways cuts its content).
OVERFLOW_SCRIPT = """
const doc = document.documentElement;
const cut = [...document.querySelectorAll('section')].filter(s => s.scrollWidth > s.clientWidth + 1)
    .map(s => (s.querySelector('h2') || s).textContent + ': ' + s.scrollWidth + ' > ' + s.clientWidth);
return {scrollWidth: doc.scrollWidth, innerWidth: window.innerWidth, cut: cut};
"""

#: Where the preview image lies once scrolled into view, against the viewport.
PREVIEW_SCRIPT = """
const img = document.getElementById(arguments[0]);
img.scrollIntoView({block: 'center', inline: 'nearest'});
const r = img.getBoundingClientRect();
return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, width: r.width,
        innerWidth: window.innerWidth, innerHeight: window.innerHeight};
"""


def check_layout(browser: Browser, base: str, out_dir: Path, label: str, preview_id: str,
                 audit: bool) -> list[Path]:
    """Load the dashboard (and the audit and admin pages) at each of :data:`LAYOUT_WIDTHS`: nothing may scroll
    sideways and the preview must lie inside the viewport. Returns the screenshots taken (one per page and width)."""
    shots = []
    for width in LAYOUT_WIDTHS:
        browser.set_window_size(width, 1000)
        pages = [("dashboard", "/", "#series")]
        if audit:
            pages += [("audit", "/audit", "#audit"), ("admin", "/admin", "#config-toml")]
        for name, path, ready in pages:
            browser.get(base + path)
            browser.wait_for(ready)
            shot = out_dir / f"{label}-{name}-{width}px.png"
            browser.screenshot(shot)
            shots.append(shot)
            print(f"screenshot: {shot}")
            overflow = browser.script(OVERFLOW_SCRIPT)
            assert overflow["innerWidth"] == width, overflow
            assert overflow["scrollWidth"] <= overflow["innerWidth"], (name, width, overflow)
            assert not overflow["cut"], (name, width, overflow["cut"])
            if name == "dashboard":
                box = browser.script(PREVIEW_SCRIPT, preview_id)
                assert box["width"] > 100, box  # scaled to fit, not shrunk to nothing
                assert 0 <= box["left"] and box["right"] <= box["innerWidth"], (width, box)
                assert 0 <= box["top"] and box["bottom"] <= box["innerHeight"], (width, box)
                timings = browser.script("const t = document.querySelector('#series .timings');"
                                         "return t.getBoundingClientRect().height"
                                         " / parseFloat(getComputedStyle(t).lineHeight);")
                assert timings <= 2.6, f"the timings cell is {timings:.1f} lines high at {width} px"
            elif name == "audit":
                assert "{" not in browser.text("#audit"), "raw JSON on the audit page"
    return shots


def test_log_in_see_preview_retry_failed_export(tmp_path: Path) -> None:
    chromedriver = require_program("chromedriver")
    chromium_binary = require_program("chromium")
    require_program("Orthanc")
    models = tmp_path / "models"
    make_tiny_model(models, name="tiny-ct", identity=False, seed=3)
    ct = make_ct_series(tmp_path / "ct", n_slices=8, rows=64, cols=64, series_description="BROWSER TEST")
    study_uid = str(dcmread(ct[0]).StudyInstanceUID)
    dicom_port, http_port, web_port = free_port(), free_port(), free_port()
    orthanc_cfg = orthanc_config(tmp_path / "orthanc", dicom_port, http_port)
    password_hash = hash_password("browser-pass-1", iterations=1000)
    config = write_config(
        tmp_path / "node.toml", models,
        [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port, "timeout_seconds": 5.0}],
        [{**CT_RULE, "forward_original": False}],
        extra=f'[web]\nusers = [{{ name = "admin", role = "admin", password_hash = "{password_hash}" }}]\n')
    config.write_text(config.read_text().replace("max_attempts = 100", "max_attempts = 1"))
    with dicom_node(tmp_path / "node", config=config, extra_env={"DICOM_NODE_WEB__PORT": str(web_port)}) as node:
        wait_for_port(web_port, process=node.process)
        from tests.peers import storescu

        assert storescu(node.port, "DENOISE", ct).returncode == 0
        wait_until(lambda: (e := db_rows(node.storage, Export)) and e[0].state.value == "failed", 120,
                   "the export to the stopped PACS failing")
        (job,) = db_rows(node.storage, Job)
        (export,) = db_rows(node.storage, Export)
        assert job.state.value == "succeeded"
        preview = node.storage / "outbox" / f"job-{job.id}" / "preview.png"
        width, height = struct.unpack(">II", preview.read_bytes()[16:24])
        assert (width, height) == (3 * 64 + 8, 64)  # before | after | difference with two 4-pixel gaps
        pacs = start_orthanc(orthanc_cfg)
        try:
            with chromium(chromedriver, chromium_binary) as browser:
                base = f"http://127.0.0.1:{web_port}"
                browser.get(base + "/")
                assert "/login" in browser.url
                browser.type("#username", "admin")
                browser.type("#password", "browser-pass-1")
                browser.click("#login")
                browser.wait_for("#series")
                assert "BROWSER TEST" in browser.text("#series")
                assert f"job {job.id} succeeded" in browser.text(f"#job-state-{job.id}")
                assert browser.wait_for_image(f"preview-{job.id}") == width
                assert "failed" in browser.text(f"#export-{export.id}")
                assert "ORTHANC@127.0.0.1" in browser.text(f"#failure-export-{export.id}")
                browser.screenshot(tmp_path / "dashboard-before-retry.png")
                check_layout(browser, base, tmp_path, "failed", f"preview-{job.id}", audit=False)
                browser.set_window_size(1400, 1000)
                browser.get(base + "/")
                browser.click(f"#retry-export-{export.id}")
                browser.wait_for("#message")
                assert "queued again" in browser.text("#message")
                deadline = time.monotonic() + 90
                while "succeeded" not in browser.text(f"#export-{export.id}"):
                    assert time.monotonic() < deadline, browser.text(f"#export-{export.id}")
                    time.sleep(1.0)
                    browser.get(base + "/")
                assert browser.find_all("#no-failures")
                browser.screenshot(tmp_path / "dashboard-delivered.png")
                check_layout(browser, base, tmp_path, "delivered", f"preview-{job.id}", audit=True)
                browser.get(base + "/audit")
                assert "export.retry" in browser.text("#audit") and "user:admin" in browser.text("#audit")
            series = orthanc_series(pacs, study_uid)
            assert len(series) == 1 and [len(v["instances"]) for v in series.values()] == [8]
            assert json.dumps(series).count("BROWSER TEST DN") == 1
        finally:
            stop_process(pacs.process)
