"""A tiny W3C WebDriver client over urllib, driving Debian's headless Chromium through ``chromedriver``.

Only what the dashboard test needs: open a URL, find elements by CSS selector, type, click, read text, run a
script, take a screenshot. No Selenium.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.peers import free_port, stop_process, wait_for_port

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000"]


class WebDriverError(Exception):
    """The driver answered with an error."""


class Browser:
    """One WebDriver session."""

    def __init__(self, driver_url: str, session_id: str) -> None:
        self.base = f"{driver_url}/session/{session_id}"

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as rsp:
                return json.loads(rsp.read())["value"]
        except urllib.error.HTTPError as exc:
            raise WebDriverError(exc.read().decode(errors="replace")[:2000]) from exc

    def get(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    @property
    def url(self) -> str:
        return str(self._call("GET", "/url"))

    def find(self, css: str) -> str:
        return str(self._call("POST", "/element", {"using": "css selector", "value": css})[ELEMENT])

    def find_all(self, css: str) -> list[str]:
        return [e[ELEMENT] for e in self._call("POST", "/elements", {"using": "css selector", "value": css})]

    def type(self, css: str, text: str) -> None:
        self._call("POST", f"/element/{self.find(css)}/value", {"text": text})

    def click(self, css: str) -> None:
        self._call("POST", f"/element/{self.find(css)}/click", {})

    def text(self, css: str) -> str:
        return str(self._call("GET", f"/element/{self.find(css)}/text"))

    def script(self, source: str, *args: Any) -> Any:
        return self._call("POST", "/execute/sync", {"script": source, "args": list(args)})

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self._call("GET", "/screenshot")))

    def set_window_size(self, width: int, height: int) -> None:
        """Resize the window; headless Chromium has no browser chrome, so the viewport gets this size."""
        self._call("POST", "/window/rect", {"width": width, "height": height})

    def wait_for(self, css: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            found = self.find_all(css)
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no element {css!r} on {self.url} after {timeout:.0f} s")
            time.sleep(0.2)

    def wait_for_image(self, element_id: str, timeout: float = 30.0) -> int:
        """Wait until the ``<img id=element_id>`` has loaded; return its natural width in pixels."""
        self.wait_for(f"#{element_id}", timeout)
        deadline = time.monotonic() + timeout
        while True:
            width = self.script(f"const i = document.getElementById('{element_id}');"
                                "return i.complete ? i.naturalWidth : 0;")
            if width:
                return int(width)
            if time.monotonic() > deadline:
                raise AssertionError(f"the image {element_id!r} did not load on {self.url}")
            time.sleep(0.2)


@contextlib.contextmanager
def chromium(chromedriver: str, chromium_binary: str) -> Iterator[Browser]:
    """Start chromedriver and a headless Chromium session with a fresh profile."""
    port = free_port()
    profile = Path(tempfile.mkdtemp(prefix="dicom-node-chromium-"))
    log = open(profile.parent / f"{profile.name}-chromedriver.log", "wb")
    driver = subprocess.Popen([chromedriver, f"--port={port}"], stdout=log, stderr=subprocess.STDOUT)
    driver_url = f"http://127.0.0.1:{port}"
    session_id = None
    try:
        wait_for_port(port, timeout=30, process=driver)
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium_binary, "args": [*CHROMIUM_ARGS, f"--user-data-dir={profile}"]}}}}
        req = urllib.request.Request(f"{driver_url}/session", data=json.dumps(caps).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as rsp:
                session_id = json.loads(rsp.read())["value"]["sessionId"]
        except urllib.error.HTTPError as exc:
            raise WebDriverError(f"cannot start Chromium: {exc.read().decode(errors='replace')[:2000]}") from exc
        yield Browser(driver_url, session_id)
    finally:
        if session_id is not None:
            with contextlib.suppress(Exception):
                urllib.request.urlopen(urllib.request.Request(f"{driver_url}/session/{session_id}",
                                                              method="DELETE"), timeout=30).read()
        stop_process(driver)
        log.close()
        shutil.rmtree(profile, ignore_errors=True)
