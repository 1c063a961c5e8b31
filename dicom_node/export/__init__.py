"""Export stage: send derived (or routed) series to their destinations.

- :mod:`dicom_node.export.exporter`: one exporter thread per destination, C-STORE, STOW-RS (through
  :mod:`dicom_node.dicomweb.stow_send`) or a local copy; C-ECHO / QIDO-RS checks of a destination.
"""
