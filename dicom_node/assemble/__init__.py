"""Assembling stage: decide when a received series is complete and what happens to it.

- :mod:`dicom_node.assemble.assembler`: quiet-time detection, versioning, queueing jobs and exports.
- :mod:`dicom_node.assemble.routing`: the routing rules (pure functions of a series' attributes).
"""
