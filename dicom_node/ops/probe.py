"""Is a node running? Ask its web port's ``/healthz`` and knock on its DICOM port, from the same host.

Used by ``dicom-node status`` and ``dicom-node health``, and by ``serve`` to log where its dashboard is. Standard
library only, so these commands stay quick.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass

from dicom_node.config import Config

#: Addresses a server binds to listen on every interface; a client on the same host reaches it on loopback.
_WILDCARD = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "*": "127.0.0.1"}


def local_host(bind_address: str) -> str:
    """The address a client on this host uses to reach a server bound to ``bind_address``."""
    return _WILDCARD.get(bind_address.strip(), bind_address.strip())


def web_url(cfg: Config, path: str = "/") -> str:
    """``http://HOST:PORT/path`` of the configured web port, as reachable from this host."""
    host = local_host(cfg.web.bind_address)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.web.port}{path}"


def unreachable_reason(exc: BaseException) -> str:
    """A short reason for a failed connection (``connection refused``, ``timed out``...), without Python's wrapping."""
    reason: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[:1].lower() + reason.strerror[1:]
    text = str(reason) or type(reason).__name__
    return text[:200]


@dataclass
class WebAnswer:
    """What a health endpoint said: ``reachable`` False with ``reason``, or the HTTP status and the body."""

    url: str
    reachable: bool
    status: int = 0
    body: bytes = b""
    reason: str = ""

    @property
    def healthy(self) -> bool:
        return self.reachable and self.status == 200

    def checks(self) -> dict[str, dict]:
        """The ``checks`` of a ``/healthz`` or ``/readyz`` answer (empty when the body is not one)."""
        try:
            found = json.loads(self.body).get("checks", {})
        except (ValueError, AttributeError):
            return {}
        return found if isinstance(found, dict) else {}


def ask_web(url: str, timeout: float = 3.0) -> WebAnswer:
    """GET ``url``; an HTTP error status is an answer (the node runs but is unhealthy), a socket error is not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as rsp:
            return WebAnswer(url, True, rsp.status, rsp.read())
    except urllib.error.HTTPError as exc:
        return WebAnswer(url, True, exc.code, exc.read())
    except (OSError, ValueError) as exc:  # URLError is an OSError; ValueError: a malformed URL
        return WebAnswer(url, False, reason=unreachable_reason(exc))


def knock(host: str, port: int, timeout: float = 2.0) -> str:
    """Open and close a TCP connection; return ``""`` when something accepted it, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return ""
    except OSError as exc:
        return unreachable_reason(exc)


@dataclass
class NodeProbe:
    """Whether the configured node answers on this host, and what each port said."""

    running: bool
    web: str
    dicom: str

    def line(self) -> str:
        """``running (...)`` or ``not running (...)``."""
        return f"{'running' if self.running else 'not running'} ({self.web}; {self.dicom})"


def probe_node(cfg: Config, timeout: float = 2.0) -> NodeProbe:
    """Ask ``/healthz`` on ``web.port`` (when not 0) and knock on ``node.port``; running when either answers.

    A process with the ``web`` role answers on both or only on the web port; a receive process on both. Workers
    and exporters have no DICOM port, and answer on their own web port when it is set.
    """
    answered = False
    if cfg.web.port:
        answer = ask_web(web_url(cfg, "/healthz"), timeout)
        if answer.reachable:
            answered = True
            web = f"{answer.url}: {'healthy' if answer.healthy else f'UNHEALTHY (HTTP {answer.status})'}"
        else:
            web = f"{answer.url}: {answer.reason}"
    else:
        web = "web.port is 0: no health endpoint"
    host = local_host(cfg.node.bind_address)
    why = knock(host, cfg.node.port, timeout)
    answered = answered or not why
    dicom = f"DICOM port {host}:{cfg.node.port}: {'accepts connections' if not why else why}"
    return NodeProbe(answered, web, dicom)
