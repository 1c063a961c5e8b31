"""DICOM encoding of derived instances: elements as explicit VR little endian bytes, whole files, and writing
them (atomically, fsynced on request).

New elements of a derived instance are put into its dataset already encoded, as RawDataElements: pydicom decodes
them when they are read and writes them as they are. :func:`encode_file` writes a dataset's bytes directly when
every element is already encoded (the derived series' fast path) and falls back to pydicom otherwise.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from dicom_node.store.fsync import fsync_path

# New elements of a derived instance are put into its dataset already encoded in explicit VR little endian, as
# RawDataElements: pydicom decodes them when they are read and writes them as they are. Values shared by every
# instance of a series are encoded once by pydicom (cached); the two per-instance ones, the SOP Instance UID and
# the Source Image Sequence, are encoded here directly (UIDs and fixed structure only).


def explicit_header(tag: int, vr: str, length: int) -> bytes:
    """An element header in explicit VR little endian (PS3.5 7.1.2)."""
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length)
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length)


def charset_key(value: Any) -> tuple[str, ...] | None:
    """SpecificCharacterSet as a hashable cache key (``None``: the default repertoire)."""
    if not value:
        return None
    return (str(value),) if isinstance(value, str) else tuple(str(v) for v in value)


def raw_element(elem: DataElement, charset: tuple[str, ...] | None) -> RawDataElement:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, list(charset) if charset else None)
    data = fp.getvalue()
    start = 12 if elem.VR in LONG_VRS else 8
    return RawDataElement(Tag(elem.tag), elem.VR, len(data) - start, data[start:], 0, False, True)


@functools.lru_cache(maxsize=4096)
def encoded_element(tag: int, vr: str, value: Hashable, charset: tuple[str, ...] | None) -> RawDataElement:
    """``value`` (a tuple for several values) encoded by pydicom as element ``tag``, once per distinct value."""
    return raw_element(DataElement(tag, vr, list(value) if isinstance(value, tuple) else value), charset)


@functools.lru_cache(maxsize=16)


@functools.lru_cache(maxsize=64)


def ui_element(tag: int, uid: str) -> RawDataElement:
    """A UI element: the UID's ASCII characters, padded with NUL to an even length (PS3.5 6.2)."""
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"
    return RawDataElement(Tag(tag), "UI", len(value), value, 0, False, True)




#: VRs whose explicit-VR header has two reserved bytes and a 32-bit length (PS3.5 7.1.2).
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})


#: The File Meta elements the builder writes (PS3.10 7.1), with their VRs; (0002,0000) and (0002,0001) are added.
FILE_META_ELEMENTS = {0x00020002: "UI", 0x00020003: "UI", 0x00020010: "UI", 0x00020012: "UI", 0x00020013: "SH"}


def file_meta_bytes(meta: Dataset) -> bytes | None:
    """Group 2 as ``write_file_meta_info(enforce_standard=True)`` writes it, for the builder's file meta (its
    elements given as text); ``None`` for anything else, which pydicom then writes."""
    items = []
    for elem in meta:
        tag = int(elem.tag)
        if tag == 0x00020001 and elem.value == b"\x00\x01":
            continue
        vr = FILE_META_ELEMENTS.get(tag)
        if vr is None or elem.VR != vr or not isinstance(elem.value, str):
            return None
        items.append((tag, vr, elem.value))
    if not {0x00020002, 0x00020003, 0x00020010} <= {tag for tag, _vr, _text in items}:
        return None  # pydicom raises the error that names what is missing
    return meta_group(items)


def meta_group(items: list[tuple[int, str, str]]) -> bytes | None:
    """Group 2 with its group length and version, the other elements given as (tag, VR, text) in tag order."""
    body = [explicit_header(0x00020001, "OB", 2) + b"\x00\x01"]
    for tag, vr, text in items:
        try:
            value = text.encode("ascii")
        except UnicodeEncodeError:
            return None
        if len(value) % 2:
            value += b"\x00" if vr == "UI" else b" "
        body.append(explicit_header(tag, vr, len(value)) + value)
    group = b"".join(body)
    return explicit_header(0x00020000, "UL", 4) + struct.pack("<I", len(group)) + group


def encode_file(ds: Dataset) -> bytes:
    """The bytes ``ds.save_as(..., enforce_file_format=True)`` writes, for a dataset in explicit VR little endian.

    A derived instance is mostly the source's elements, still raw (undecoded) when the source was explicit VR
    little endian too. pydicom writes each through a fresh buffer and a dozen checks (about 4 ms of Python per
    CT slice, beside the network on the same cores); a raw element of defined length in the file's own
    encoding is only its header and its stored value, so those are written here directly and every other
    element goes through pydicom's ``write_data_element``. Tested byte for byte against ``save_as``.
    """
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(ds.preamble or b"\x00" * 128)
    fp.write(b"DICM")
    meta = file_meta_bytes(ds.file_meta)
    if meta is None:
        write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
    else:
        fp.write(meta)
    parts = encoded_parts(ds)
    if parts is None:  # raw elements must be converted: leave it all to pydicom
        write_dataset(fp, ds)
        return fp.getvalue()
    fp.write(b"".join(data for _tag, data in parts))
    return fp.getvalue()


def encoded_parts(ds: Dataset) -> list[tuple[int, bytes]] | None:
    """Each element of ``ds`` (explicit VR little endian) as its encoded bytes, in order; ``None`` when the dataset
    was read in another encoding or character set (its raw elements would need converting)."""
    if not (tuple(ds.original_encoding) == (False, True) and ds.original_character_set == ds._character_set):
        return None
    encoding = ds.get("SpecificCharacterSet", "iso8859")
    parts = []
    for elem in ds.elements():
        tag = elem.tag
        if tag & 0xFFFF == 0 and tag >> 16 > 6:  # retired group lengths are not written (PS3.5 7.2)
            continue
        data = raw_bytes(elem)
        if data is None:
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_data_element(fp, elem, encoding)
            data = fp.getvalue()
        parts.append((int(tag), data))
    return parts


def raw_bytes(elem: Any) -> bytes | None:
    """A raw element of defined length in explicit VR little endian, encoded: its header and its stored value
    (``None`` for anything pydicom must write)."""
    if not (elem.is_raw and elem.VR and elem.length != 0xFFFFFFFF and not elem.is_implicit_VR
            and elem.is_little_endian and not elem.is_buffered):
        return None
    value = elem.value or b""
    if elem.VR not in LONG_VRS and len(value) > 0xFFFF:
        return None
    return explicit_header(int(elem.tag), elem.VR, len(value)) + value


def write_instance(ds: Dataset, folder: str | os.PathLike[str], durable: bool = False) -> Path:
    """Write a derived instance as ``folder/<SOPInstanceUID>.dcm`` (atomically: temp file, then rename).

    With ``durable`` the file's data is fsynced before the rename (the caller fsyncs the folder once all are
    written; see :func:`dicom_node.denoise.engine.denoise_series`).
    """
    if ds.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, RLELossless):
        return write_encoded(encode_file(ds), str(ds.SOPInstanceUID), folder, durable)
    out_dir = Path(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{ds.SOPInstanceUID}.tmp"
    ds.save_as(tmp, enforce_file_format=True)
    if durable:
        fsync_path(tmp)
    path = out_dir / f"{ds.SOPInstanceUID}.dcm"
    os.replace(tmp, path)
    return path


def write_encoded(data: bytes, sop_instance_uid: str, folder: str | os.PathLike[str], durable: bool = False) -> Path:
    """Write an encoded instance as ``folder/<SOPInstanceUID>.dcm`` (atomically; fsynced with ``durable``)."""
    out_dir = Path(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{sop_instance_uid}.dcm"
    tmp = out_dir / f".{sop_instance_uid}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path

