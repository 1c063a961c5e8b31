"""The web side of the node: dashboard, login, JSON API, ``/metrics``, ``/healthz`` and ``/readyz``.

A small WSGI application on the standard library's threaded WSGI server, on ``web.port`` (never the DICOM port).
``auth`` holds users, sessions and CSRF tokens (password guessing is slowed down and locked out by
:mod:`dicom_node.store.throttle`), ``pages`` renders HTML, ``app`` routes requests, ``server`` runs it.
"""
