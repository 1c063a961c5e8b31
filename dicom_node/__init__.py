"""dicom-node: receive DICOM studies, denoise series, send derived series to PACS."""

__version__ = "0.1.0"
