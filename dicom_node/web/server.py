"""Runs the web application on the standard library's WSGI server, one thread per request, in the background."""

from __future__ import annotations

import logging
import socketserver
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from dicom_node.web.app import DashboardApp

LOGGER = logging.getLogger(__name__)


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """A WSGI server answering each request in its own daemon thread."""

    daemon_threads = True
    allow_reuse_address = True


class QuietHandler(WSGIRequestHandler):
    """Logs requests at DEBUG through :mod:`logging` instead of printing them to stderr."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        LOGGER.debug("%s %s", self.address_string(), format % args)


class WebServer:
    """A started web server; :meth:`shutdown` stops it."""

    def __init__(self, server: ThreadingWSGIServer, thread: threading.Thread, app: Any = None) -> None:
        self.server = server
        self.thread = thread
        #: The :class:`~dicom_node.web.app.DashboardApp` (a configuration reload updates its users and tokens).
        self.app = app

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def start_web(node: Any) -> WebServer:
    """Serve the dashboard (role ``web``) or only ``/metrics`` and the health checks on ``web.port``.

    Raises
    ------
    OSError
        When the port cannot be bound.
    """
    cfg = node.cfg
    app = DashboardApp(node)
    server = make_server(cfg.web.bind_address, cfg.web.port, app, server_class=ThreadingWSGIServer,
                         handler_class=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="web", daemon=True)
    thread.start()
    what = "dashboard, /metrics" if app.dashboard else "/metrics"
    LOGGER.info("web: %s, /healthz, /readyz on http://%s:%d/", what, cfg.web.bind_address, server.server_address[1])
    return WebServer(server, thread, app)
