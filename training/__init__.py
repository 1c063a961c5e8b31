"""Training package: makes the model folders that ``dicom_node`` loads.

Nothing in ``dicom_node`` imports this package at run time.
"""
