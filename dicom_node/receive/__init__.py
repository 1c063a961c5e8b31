"""Receiving stage: the C-STORE SCP and the durable storing path every received instance takes.

- :mod:`dicom_node.receive.receiver`: the SCP, :func:`~dicom_node.receive.receiver.store_instance` (also used by
  STOW-RS), spool reindexing.
- :mod:`dicom_node.receive.dataset_check`: structural check of a received dataset before it is stored.
"""
