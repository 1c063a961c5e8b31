"""Crafted malformed DICOM data for the bad-input tests.

Each function takes a well-formed encoded dataset (explicit VR little endian, no file meta) and breaks it in one
way a real sender could.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import cast

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID

PIXEL_DATA_HEADER = b"\xe0\x7f\x10\x00OW\x00\x00"


def encode_dataset(ds: Dataset) -> bytes:
    """Encode ``ds`` (without file meta) in explicit VR little endian."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def file_bytes(ds: Dataset, body: bytes) -> bytes:
    """A Part 10 file: preamble, file meta from ``ds.file_meta`` and the (possibly broken) ``body``."""
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    return out.getvalue() + body


def truncated(body: bytes) -> bytes:
    """Cut in the middle of the pixel data."""
    return body[: body.index(PIXEL_DATA_HEADER) + 12 + 1000]


def huge_length(body: bytes) -> bytes:
    """Pixel data declaring 4 GB - 16 bytes."""
    i = body.index(PIXEL_DATA_HEADER)
    return body[: i + 8] + struct.pack("<I", 0xFFFFFFF0) + body[i + 12:]


def garbage_after_preamble(body: bytes) -> bytes:
    """Random-looking bytes where the dataset should start."""
    return bytes((i * 37 + 11) % 256 for i in range(4096)) + body


def wrong_vr(body: bytes) -> bytes:
    """Rows (0028,0010) with a VR that does not exist."""
    i = body.index(b"\x28\x00\x10\x00US")
    return body[: i + 4] + b"XQ" + body[i + 6:]


def uid_with_dots(ds: Dataset, uid: str = "1.2.3/../../etc") -> Dataset:
    """A copy of ``ds`` whose SOP Instance UID tries to escape the spool."""
    bad = ds.copy()
    bad.SOPInstanceUID = uid
    bad.file_meta = cast(FileMetaDataset, ds.file_meta.copy())  # (a FileMetaDataset; typed as a Dataset)
    bad.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    return bad


def write_variants(source: Path, out_dir: Path) -> dict[str, Path]:
    """Write every malformed variant of ``source`` as a Part 10 file; return name -> path."""
    ds = dcmread(source)
    body = encode_dataset(ds)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = {
        "truncated": file_bytes(ds, truncated(body)),
        "huge_length": file_bytes(ds, huge_length(body)),
        "garbage_after_preamble": file_bytes(ds, garbage_after_preamble(body)),
        "wrong_vr": file_bytes(ds, wrong_vr(body)),
    }
    dotted = uid_with_dots(ds)
    variants["uid_with_dots"] = file_bytes(dotted, encode_dataset(dotted))
    paths = {}
    for name, data in variants.items():
        path = out_dir / f"{name}.dcm"
        path.write_bytes(data)
        paths[name] = path
    return paths
