"""The DICOM network (DIMSE over TCP/TLS): everything that depends on pynetdicom's internals lives here.

- :mod:`dicom_node.dimse.reactor`: event-driven association reactor, direct C-STORE encoders, connection gate.
- :mod:`dicom_node.dimse.transport`: TCP_NODELAY, TLS contexts, why an association failed, C-ECHO.
"""
