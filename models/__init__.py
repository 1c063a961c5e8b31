"""Denoising networks, the model-folder format and its loader.

``models`` imports neither ``dicom_node`` nor ``training``.
"""
