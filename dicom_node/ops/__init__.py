"""Running the node: process wiring (:mod:`~dicom_node.ops.service`), metrics, health checks, probing a running
node, configuration reload and edits."""
